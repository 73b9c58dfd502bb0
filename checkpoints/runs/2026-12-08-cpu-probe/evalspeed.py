import sys, time, torch
torch.set_num_threads(1)
from metaopt.evaluate.suites import SUITES
from metaopt.evaluate.runner import evaluate_suite
suite=SUITES[sys.argv[1]]; task=sys.argv[2]; seeds=int(sys.argv[3]); steps=int(sys.argv[4]); opts=sys.argv[5].split(',')
res={}
for rep in range(2):
    for comp in ([True, False] if rep==0 else [False, True]):
        t=time.perf_counter()
        runs=evaluate_suite(suite, {o:{} for o in opts}, range(seeds), steps, progress=False, tasks=[task], batched=False, compile_learned=comp)
        dt=time.perf_counter()-t
        res.setdefault(comp,[]).append((dt, [r.losses[-1] for r in runs]))
        print(f"{task} {opts} compiled={comp}: {dt:.1f} s wall; step {sum(r.seconds_per_step for r in runs)/len(runs)*1e3:.1f} ms; final {sum(r.losses[-1] for r in runs)/len(runs):.4f}", flush=True)
