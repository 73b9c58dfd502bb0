import time, sys, types, torch
torch.set_num_threads(1)
import metaopt.learned.fused as fu
from metaopt.learned.hyperadam import HyperAdam
A=[4.89352455891786e-03,6.37261928875436e-04,1.48572235717979e-05,5.12229709037114e-08,-8.60467152213735e-11,2.00018790482477e-13,-2.76076847742355e-16]
B=[4.89352518554385e-03,2.26843463243900e-03,1.18534705686654e-04,1.19825839466702e-06]
def ftanh(x):
    x=x.clamp(-7.99881172180175781,7.99881172180175781)
    x2=x*x
    p=x2*A[6]+A[5]; p=p*x2+A[4]; p=p*x2+A[3]; p=p*x2+A[2]; p=p*x2+A[1]; p=p*x2+A[0]; p=p*x
    q=x2*B[3]+B[2]; q=q*x2+B[1]; q=q*x2+B[0]
    return p/q
def fsig(x): return 0.5+0.5*ftanh(0.5*x)
m=types.SimpleNamespace(**{k:getattr(torch,k) for k in dir(torch) if not k.startswith('__')}); m.tanh=ftanh; m.sigmoid=fsig
cf=torch.compile(fu._hyperadam_forward, fullgraph=True); cb=torch.compile(fu._hyperadam_backward, fullgraph=True)
mods={'exact':torch,'approx':m}
variants=mods
torch.manual_seed(0)
lopt=HyperAdam(normalize_state=True)
n=31820; J=20
grad=torch.randn(n)*1e-2
state=[torch.randn(n,J)*0.1 for _ in range(6)]; state[4]=torch.rand(n,J); state[5]=torch.rand(n,J)
theta=fu.hyperadam_theta(lopt); theta=type(theta)(*[t.detach() for t in theta])
douts=[torch.randn(n)]+[torch.randn(n,J) for _ in range(6)]
def run(v):
    fu.torch=mods[v]; f,b=cf,cb
    out=f(grad,state,theta,1e-8,True)
    b(grad,state,theta,1e-8,douts,True,True)
    return out
for v in variants:
    for _ in range(3): run(v)
o1=run('exact'); o2=run('approx'); print('max diff', max((a-b).abs().max().item() for a,b in zip(o1,o2)))
res={v:[] for v in variants}
for r in range(int(sys.argv[1])):
    for v in variants:
        t=time.perf_counter()
        for _ in range(5): run(v)
        res[v].append((time.perf_counter()-t)/5)
for v,ts in res.items():
    ts.sort(); print(v, f"median {ts[len(ts)//2]*1e3:.1f} ms min {ts[0]*1e3:.1f}")
