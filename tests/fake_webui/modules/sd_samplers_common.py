class InterruptedException(BaseException):
    pass


class SamplerData:
    def __init__(self, name, options=None):
        self.name, self.options = name, options or {}

    def total_steps(self, steps):
        return steps * 2 if self.options.get("second_order") else steps
