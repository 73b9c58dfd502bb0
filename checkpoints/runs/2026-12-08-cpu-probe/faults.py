import sys, time, tempfile, resource, ctypes, torch
torch.set_num_threads(1)
if sys.argv[1]=='tuned':
    libc=ctypes.CDLL("libc.so.6"); print('mallopt', libc.mallopt(-1, 2**30), libc.mallopt(-3, 2**25))
from metaopt.meta import preset, MetaTrainer
cfg=preset('hyperadam-paper', meta_batch=2, seed=0)
with tempfile.TemporaryDirectory() as d:
    tr=MetaTrainer(cfg, d, device=torch.device('cpu'))
    for _ in range(2): tr.meta_step_once()
    r0=resource.getrusage(resource.RUSAGE_SELF); t=time.perf_counter()
    for _ in range(6): tr.meta_step_once()
    r1=resource.getrusage(resource.RUSAGE_SELF); dt=time.perf_counter()-t
    print(sys.argv[1], f"{6*40/dt:.1f} steps/s; minflt/meta-step {(r1.ru_minflt-r0.ru_minflt)/6:.0f}; sys s/meta-step {(r1.ru_stime-r0.ru_stime)/6:.3f} user {(r1.ru_utime-r0.ru_utime)/6:.3f}; maxrss {r1.ru_maxrss/1e6:.2f} GB")
