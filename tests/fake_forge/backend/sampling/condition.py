"""backend/sampling/condition.py: A1111 conds -> Forge cond dicts (tensor or {'crossattn','vector'})."""


def compile_conditions(cond):
    if cond is None:
        return None
    if not isinstance(cond, dict):
        return [{"cross_attn": cond, "model_conds": {"c_crossattn": cond}}]
    result = {"cross_attn": cond["crossattn"], "pooled_output": cond["vector"],
              "model_conds": {"c_crossattn": cond["crossattn"], "y": cond["vector"]}}
    if "guidance" in cond:
        result["model_conds"]["guidance"] = cond["guidance"]
    return [result]


def compile_weighted_conditions(cond, weights):
    results = []
    for cond_pre in map(list, zip(*weights, strict=True)):
        indices = [i for i, _ in cond_pre]
        feed = {k: v[indices] for k, v in cond.items()} if isinstance(cond, dict) else cond[indices]
        h = compile_conditions(feed)
        h[0]["strength"] = cond_pre[-1][1]
        results += h
    return results
