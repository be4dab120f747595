"""Soak benchmark (a script, not a test): does a long-running WebUI give back what DS takes?

Runs N cycles against a real WebUI's API and records the server's RSS after each one:
  plain    : a generation without DS (the host's own baseline)
  switch   : the host's own checkpoint switch A -> B -> A (what the host itself keeps per switch)
  ds-free  : DS generation (loads the source) -> POST /delta-sampling/v1/free
  ds-off   : DS generation -> a generation with DS off -> Free (the off run keeps the source cached)
  ds-swap  : DS generation with source A, then with source B (the cache of 1 releases A)
and prints per variant: RSS before, after the first cycle, and growth per cycle after cycle 2, as MiB and as
a fraction of one source's size (measured as RSS with a source loaded minus RSS after Free).

    python bench/soak_webui.py --url http://127.0.0.1:7863 --pid $(cat server.pid) --source-a sd15_a \\
        --source-b sd15_b --cycles 6
"""

from __future__ import annotations

import argparse
import time

from webui_api import call, ds_args, rss_mib
from webui_api import txt2img as generate


def txt2img(url: str, ds_source: str | None) -> None:
    ds = ds_args(source=ds_source, adapter_kind="prompt", strength=2.0, adapted_prompt="a photo of a dog")
    generate(url, ds if ds_source else None, steps=4, size=64)


def variants(url: str, a: str, b: str, target_a: str, target_b: str) -> dict:
    free = lambda: call(url, "/delta-sampling/v1/free", {})  # noqa: E731
    return {
        "plain": lambda: txt2img(url, None),
        "switch": lambda: (call(url, "/sdapi/v1/options", {"sd_model_checkpoint": target_b}), txt2img(url, None),
                           call(url, "/sdapi/v1/options", {"sd_model_checkpoint": target_a}), txt2img(url, None)),
        "ds-free": lambda: (txt2img(url, a), free()),
        "ds-off": lambda: (txt2img(url, a), txt2img(url, None), free()),
        "ds-swap": lambda: (txt2img(url, a), txt2img(url, b)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, required=True, help="the WebUI server's process id (RSS is read from /proc)")
    parser.add_argument("--source-a", required=True)
    parser.add_argument("--source-b", required=True)
    parser.add_argument("--target-a", help="checkpoint title for the host's own switch (default: source A)")
    parser.add_argument("--target-b", help="(default: source B)")
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = parser.parse_args()
    runs = variants(args.url, args.source_a, args.source_b, args.target_a or args.source_a,
                    args.target_b or args.source_b)
    txt2img(args.url, args.source_a)
    loaded = rss_mib(args.pid)
    call(args.url, "/delta-sampling/v1/free", {})
    source_size = max(loaded - rss_mib(args.pid), 1.0)
    print(f"one source: {source_size:.0f} MiB (RSS with it loaded minus after Free)")
    print(f"{'variant':8} {'before':>8} {'cycle 1':>8} {'last':>8} {'growth/cycle after 2':>22} {'of a source':>12} {'s/cycle':>8}")
    for name, run in runs.items():
        if args.only and name not in args.only:
            continue
        before = rss_mib(args.pid)
        samples, start = [], time.time()
        for _ in range(args.cycles):
            run()
            samples.append(rss_mib(args.pid))
        tail = samples[1:]
        growth = (tail[-1] - tail[0]) / max(len(tail) - 1, 1)
        print(f"{name:8} {before:8.0f} {samples[0]:8.0f} {samples[-1]:8.0f} {growth:19.1f} MiB {growth / source_size:11.2%} "
              f"{(time.time() - start) / args.cycles:8.1f}")
        print("         " + " ".join(f"{s:.0f}" for s in samples))


if __name__ == "__main__":
    main()
