"""The op-contract refactor against the package before it, interleaved: each round runs
one process per (version, case), A = the checkout at bc1a951, B = this one (PYTHONPATH
picks the package; full-size ResNet-50 tensors, backend cpp, median of 25 steps after 3).
Usage: python bench/results/ab-contract/step_times.py A_ROOT B_ROOT [ROUNDS]"""
import json
import os
import subprocess
import sys
import textwrap

CASE = textwrap.dedent("""
    import json, statistics, sys, time, torch, cblr_ext
    from bench import suites
    torch.manual_seed(0)
    rule, kwargs = sys.argv[1], json.loads(sys.argv[2])
    shapes = [s for _, s in suites.get("resnet50").shapes]
    ps = [torch.nn.Parameter(torch.randn(s) * 0.05) for s in shapes]
    gs = [torch.randn(s) * 1e-3 for s in shapes]
    for p, g in zip(ps, gs):
        p.grad = g.clone()
    opt = getattr(cblr_ext, rule)(ps, lr=0.01, momentum=0.9, weight_decay=1e-4, backend="cpp", **kwargs)
    def closure():
        for p, g in zip(ps, gs):
            p.grad = g.clone()
    times = []
    for i in range(28):
        t = time.perf_counter()
        opt.step(closure if rule == "CBLR" else None)
        times.append(time.perf_counter() - t)
    print(json.dumps({"file": cblr_ext.__file__, "ms": 1e3 * statistics.median(times[3:])}))
""")
CASES = {"LARS": ("LARS", {}), "MCLR exact": ("MCLR", {}), "MCLR approx": ("MCLR", {"median": "approx"}),
         "CBLR": ("CBLR", {})}


def run(root, rule, kwargs):
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", CASE, rule, json.dumps(kwargs)], env=env, cwd=root,
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["file"].startswith(os.path.abspath(root)), result["file"]
    return result["ms"]


def main():
    roots = {"A": sys.argv[1], "B": sys.argv[2]}
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    times = {(v, c): [] for c in CASES for v in roots}
    for _ in range(rounds):
        for case, (rule, kwargs) in CASES.items():
            for version, root in roots.items():
                times[(version, case)].append(run(root, rule, kwargs))
    for case in CASES:
        a, b = sorted(times[("A", case)]), sorted(times[("B", case)])
        med = lambda xs: xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
        print(f"| {case} | {', '.join(f'{x:.1f}' for x in times[('A', case)])} | "
              f"{', '.join(f'{x:.1f}' for x in times[('B', case)])} | {med(b) / med(a):.2f} |")


if __name__ == "__main__":
    main()
