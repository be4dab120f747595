"""A1111's Timer (records named durations)."""


class Timer:
    def __init__(self, print_log=False):
        self.records = {}

    def record(self, category, extra_time=0, disable_log=False):
        self.records[category] = self.records.get(category, 0) + extra_time
