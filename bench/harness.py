"""Shared benchmark harness: timing with warm-up, median and spread, peak
memory, baselines measured in the same run, results appended to
bench/results/<family>.csv with the columns of DESIGN.md.

    from harness import Bench
    b = Bench("kd_loss")                      # -> bench/results/kd_loss.csv
    r = b.run("kd_loss", "kdfast", fn, mode="fwd+bwd", x_name="V", x_value=30522, config="N=4096 fp32")
    b.run("kd_loss", "torch-eager", ref_fn, ...)
    b.table()                                 # prints time, memory and ratios vs baselines
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import os
import resource
import statistics
import sys
import threading
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = ["kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p20", "p50", "p80", "config",
           "device", "timestamp", "version"]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


class _RssSampler:
    """Peak resident memory of this process during a call (CPU), sampled every 1 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def _malloc_for_measuring(on: bool):
    """glibc only: mmap blocks >= 128 KiB while measuring (exact RSS), 32 MiB otherwise."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024 if on else 32 * 1024 * 1024)
    libc.malloc_trim(0)


def _quantiles(times):
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return {"p20": q[1], "p50": statistics.median(times), "p80": q[7]}


def peak_memory(fn, *, device="cpu", setup=None):
    """Peak extra memory (bytes) of one fn() call over the memory in use just before it.

    setup(), if given, runs first and outside the measurement (e.g. freeing the previous call's gradients, so
    that the baseline does not include them)."""
    cuda = device.startswith("cuda")
    if setup is not None:
        setup()
    gc.collect()
    # kdfast keeps a freed large CPU gradient for reuse (kdfast.buffer_cache); empty it so the
    # memory run counts that buffer as a new allocation, not as part of the baseline.
    kdfast_cache = sys.modules.get("kdfast.buffer_cache")
    if kdfast_cache is not None:
        kdfast_cache.clear()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # glibc keeps freed heap memory, so RSS would miss what a call allocates. For the
    # memory run only, large blocks are mmap'd (returned to the OS on free).
    _malloc_for_measuring(True)
    try:
        with _RssSampler() as s:
            fn()
    finally:
        _malloc_for_measuring(False)
    return max(0, s.peak - s.base)


def _timed(fn, cuda):
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fn, *, device="cpu", warmup=2, reps=7, min_time=0.0, setup=None):
    """Run fn() warmup times, then reps times; returns times (s) p20/p50/p80 and peak extra memory (bytes).

    setup(), if given, runs before every fn() call, outside the timing and the memory measurement."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    t_start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - t_start < min_time:
        if setup is not None:
            setup()
        times.append(_timed(fn, cuda))
        if len(times) >= 1000:
            break
    return dict(_quantiles(times), peak_bytes=peak_memory(fn, device=device, setup=setup))


def measure_interleaved(fns, *, device="cpu", warmup=1, reps=3, setup=None):
    """Time several functions rep by rep in turn (a, b, a, b, ...), so that a slow phase of a shared machine
    hits all of them alike; returns {name: measure()-style dict} (peak memory measured per function)."""
    cuda = device.startswith("cuda")
    times = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            if setup is not None:
                setup()
            t = _timed(fn, cuda)
            if i >= warmup:
                times[name].append(t)
    return {name: dict(_quantiles(times[name]), peak_bytes=peak_memory(fn, device=device, setup=setup))
            for name, fn in fns.items()}


class Bench:
    def __init__(self, family: str, device: str = "cpu", out_dir: str = RESULTS):
        self.family = family
        self.device = device
        self.dev_name = device_name(device)
        self.path = os.path.join(out_dir, f"{family}.csv")
        self.rows: list[dict] = []
        os.makedirs(out_dir, exist_ok=True)

    def run(self, kernel, provider, fn, *, mode="fwd+bwd", x_name="", x_value="", config="", warmup=2, reps=7,
            setup=None):
        try:
            m = measure(fn, device=self.device, warmup=warmup, reps=reps, setup=setup)
        except Exception as e:  # a baseline that cannot run (OOM, missing package) is reported, not fatal
            print(f"  {kernel}/{provider} {config}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            return None
        self._record(kernel, provider, m, mode=mode, x_name=x_name, x_value=x_value, config=config)
        return m

    def run_interleaved(self, kernel, fns, *, mode="fwd+bwd", x_name="", x_value="", config="", warmup=1, reps=3,
                        setup=None):
        """Like run() for several providers {provider: fn}, timed rep by rep in turn (measure_interleaved)."""
        try:
            ms = measure_interleaved(fns, device=self.device, warmup=warmup, reps=reps, setup=setup)
        except Exception as e:
            print(f"  {kernel}/{'+'.join(fns)} {config}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            return None
        for provider, m in ms.items():
            self._record(kernel, provider, m, mode=mode, x_name=x_name, x_value=x_value, config=config)
        return ms

    def _common(self, kernel, provider, mode, x_name, x_value, config):
        import kdfast
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return dict(kernel=kernel, provider=provider, mode=mode, x_name=x_name, x_value=x_value, config=config,
                    device=self.dev_name, timestamp=stamp, version=kdfast.__version__)

    def _record(self, kernel, provider, m, *, mode, x_name, x_value, config):
        common = self._common(kernel, provider, mode, x_name, x_value, config)
        time_row = dict(common, metric="time", unit="ms", p20=m["p20"] * 1e3, p50=m["p50"] * 1e3,
                        p80=m["p80"] * 1e3)
        mem = m["peak_bytes"] / 2**20
        mem_row = dict(common, metric="peak_memory", unit="MiB", p20=mem, p50=mem, p80=mem)
        self.rows += [time_row, mem_row]
        self._append([time_row, mem_row])

    def add_metric(self, kernel, provider, metric, unit, value, *, mode="fwd+bwd", x_name="", x_value="",
                   config=""):
        """Record one extra measured number (e.g. a second memory figure) as its own row."""
        row = dict(self._common(kernel, provider, mode, x_name, x_value, config), metric=metric, unit=unit,
                   p20=value, p50=value, p80=value)
        self.rows.append(row)
        self._append([row])

    def _append(self, rows):
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})

    def table(self, ours="kdfast", file=sys.stdout):
        """Print this run's results with one ratio convention for every row.

        In each group (kernel, mode, x, config) the reference is the first baseline
        provider (the first whose name does not start with ``ours``); every row shows
        ``speedup`` = reference time / row time and ``mem x`` = reference peak / row peak,
        so > 1 always means "this row is faster / smaller than the reference".
        """
        groups: dict[tuple, dict] = {}
        for r in self.rows:
            key = (r["kernel"], r["mode"], r["x_name"], r["x_value"], r["config"])
            groups.setdefault(key, {}).setdefault(r["provider"], {})[r["metric"]] = r["p50"]
        print(f"\n{self.family} on {self.dev_name}", file=file)
        print(f"{'kernel':22s} {'config':28s} {'provider':18s} {'time ms':>10s} {'peak MiB':>9s} "
              f"{'speedup':>8s} {'mem x':>7s}", file=file)
        for key, provs in groups.items():
            ref_name = next((p for p in provs if not p.startswith(ours) and "time" in provs[p]), None)
            ref = provs.get(ref_name, {})
            for p, d in provs.items():
                sp = mx = ""
                if ref and "time" in d and d["time"] > 0:
                    sp = "ref" if p == ref_name else f"{ref['time'] / d['time']:.2f}x"
                    if p != ref_name and ref.get("peak_memory", 0) > 0 and d.get("peak_memory", 0) > 0:
                        mx = f"{ref['peak_memory'] / d['peak_memory']:.1f}x"
                cfg = f"{key[4]} {key[2]}={key[3]}" if key[2] else key[4]
                print(f"{key[0]:22s} {cfg[:28]:28s} {p:18s} {d.get('time', float('nan')):10.2f} "
                      f"{d.get('peak_memory', float('nan')):9.1f} {sp:>8s} {mx:>7s}", file=file)
        print("(speedup / mem x: the group's reference row (a baseline, marked ref) divided by this row's time or "
              "peak memory; > 1 means this row is faster / smaller)", file=file)
