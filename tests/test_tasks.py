"""The task registry contract, the task families, and the training tricks (Random Scaling, Convex Combination)."""

import math

import pytest
import torch

import meta_tasks
from meta_tasks import datasets
from meta_tasks.base import Batch
from meta_tasks.tasks import QuadraticTask
from meta_tasks.tricks import CONVEX_CLIP, CONVEX_KEY, ConvexCombination, GaussianInit, RandomScaling, hyperadam_tricks

HAVE_FMNIST = datasets.find_dataset("fashion-mnist") is not None
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="real Fashion-MNIST not installed (bash .ci/setup)")
BIG = {"vgg11", "resnet18", "resnet34", "wrn-16-4"}


def gen(seed):
    return torch.Generator().manual_seed(seed)


@needs_fmnist
@pytest.mark.parametrize("name", meta_tasks.TASKS)
def test_registry_contract_on_real_fashion_mnist(name):
    """Every task builds, inits to its declared shapes, yields a finite scalar loss with gradients shaped like the
    params, and is deterministic given its generator."""
    task = meta_tasks.get_task(name, dataset="fashion-mnist")
    batch_size = 4 if name in BIG else 16
    params = task.init(gen(0))
    assert {n: p.shape for n, p in params.items()} == task.param_shapes()
    assert all(torch.equal(p, q) for p, q in zip(params.values(), task.init(gen(0)).values()))
    assert any(not torch.equal(p, q) for p, q in zip(params.values(), task.init(gen(1)).values()))

    b1, b2 = task.sample_batch(gen(5), batch_size=batch_size), task.sample_batch(gen(5), batch_size=batch_size)
    assert torch.equal(b1.x, b2.x) and torch.equal(b1.y, b2.y)

    leaves = {n: p.requires_grad_() for n, p in params.items()}
    loss = task.loss(leaves, b1)
    assert loss.dim() == 0 and torch.isfinite(loss)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    assert all(g.shape == p.shape and torch.isfinite(g).all() for g, p in zip(grads, leaves.values()))
    with torch.no_grad():
        assert float(task.loss(params, b1)) == float(loss)  # same batch, same params: same loss (dropout seeded too)


def test_unknown_task_and_family_list_valid_names():
    with pytest.raises(ValueError, match="Valid names: .*mlp-sigmoid"):
        meta_tasks.get_task("mlp-softplus")
    with pytest.raises(ValueError, match="Valid names: .*quadratic"):
        meta_tasks.get_family("nope")


@needs_fmnist
def test_evaluate_reports_loss_and_topk_on_held_out_split():
    task = meta_tasks.get_task("mlp-sigmoid")
    metrics = task.evaluate(task.init(gen(0)), "test")
    assert set(metrics) == {"loss", "top1", "top2"}
    assert 0 <= metrics["top1"] <= metrics["top2"] <= 1
    assert 1.5 < metrics["loss"] < 4  # an untrained 10-class classifier is near log(10) = 2.30


@needs_fmnist
def test_batchnorm_buffers_are_explicit():
    task = meta_tasks.get_task("cnn-1-bn")
    params, buffers = task.init(gen(0)), task.init_buffers()
    before = {n: b.clone() for n, b in buffers.items()}
    task.loss(params, task.sample_batch(gen(1), batch_size=8), buffers)
    assert any(not torch.equal(before[n], buffers[n]) for n in buffers if "running_mean" in n)
    fresh = task.init_buffers()
    task.loss(params, task.sample_batch(gen(1), batch_size=8))  # no buffers given: scratch copies only
    assert all(torch.equal(fresh[n], b) for n, b in task.init_buffers().items())


@needs_fmnist
def test_dropout_is_reproducible_from_the_batch_seed():
    task = meta_tasks.get_task("cnn-2-dropout")
    params = task.init(gen(0))
    b = task.sample_batch(gen(3), batch_size=8)
    torch.manual_seed(123)
    l1 = task.loss(params, b)
    torch.manual_seed(456)
    l2 = task.loss(params, b)
    assert float(l1) == float(l2)
    other = Batch(b.x, b.y, b.seed + 1)
    assert float(task.loss(params, other)) != float(l1)


def test_sine_tasks_regress_the_next_value():
    task = meta_tasks.get_task("lstm-sine")
    b = task.sample_batch(gen(0), batch_size=32)
    assert b.x.shape == (32, 10, 1) and b.y.shape == (32, 1)
    p = task.init(gen(0))
    assert torch.isfinite(task.loss(p, b))
    assert task.evaluate(p)["loss"] == task.evaluate(p)["loss"]  # fixed test set
    two = meta_tasks.get_task("lstm-sine-2layer")
    assert two.num_params() > task.num_params()
    small = meta_tasks.get_task("lstm-sine-small-noise")
    assert small.data.noise_std == 0.01 and task.data.noise_std == 0.1


def test_quadratic_task_and_family():
    task = meta_tasks.get_task("quadratic", dim=5, seed=3)
    assert task.param_shapes() == {"theta": torch.Size([5])}
    theta = task.init(gen(0))["theta"].requires_grad_()
    loss = task.loss({"theta": theta}, task.sample_batch(gen(0)))
    (g,) = torch.autograd.grad(loss, theta)
    assert torch.allclose(g, 2 * task.W.T @ (task.W @ theta - task.y))
    assert task.minimum() < 1e-8  # square W: an exact solution exists
    fam = meta_tasks.get_family("quadratic", dim=5)
    t1, t2 = fam.sample(gen(0)), fam.sample(gen(0))
    assert torch.equal(t1.W, t2.W) and not torch.equal(t1.W, fam.sample(gen(1)).W)
    scaled = meta_tasks.get_task("quadratic", dim=5, seed=3, scale=0.01)  # the same W, y; the loss times 0.01
    assert torch.equal(scaled.W, task.W) and torch.equal(scaled.y, task.y)
    assert torch.allclose(scaled.loss({"theta": theta}, scaled.sample_batch(gen(0))), 0.01 * loss)
    with pytest.raises(ValueError, match="Invalid scale"):
        meta_tasks.get_task("quadratic", scale=0.0)


def test_choice_family_draws_from_the_generator():
    fam = meta_tasks.get_family("mlp-activations")
    names = {fam.sample(gen(s)).name for s in range(12)} if HAVE_FMNIST else set()
    if HAVE_FMNIST:
        assert names == {"mlp-sigmoid", "mlp-relu", "mlp-elu", "mlp-tanh"}


# ---------------------------------------------------------------------------------------------------------------------
# Training tricks, on a quadratic (no data needed) in float64


def quad64(seed=0, dim=6):
    task = QuadraticTask.sample(gen(seed), dim=dim)
    return QuadraticTask(task.W.double(), task.y.double())


def test_random_scaling_with_unit_scale_is_the_plain_task():
    task = quad64()
    rs = RandomScaling(task, r=0.0, generator=gen(1))
    assert all(torch.equal(c, torch.ones_like(c)) for c in rs.scales.values())
    p = rs.init(gen(2))
    assert torch.equal(p["theta"], task.init(gen(2))["theta"])
    assert torch.equal(rs.loss(p, Batch(torch.empty(0), torch.empty(0))), task.loss(p, Batch(torch.empty(0), torch.empty(0))))


def test_random_scaling_gradient_is_the_chain_rule():
    task = quad64()
    rs = RandomScaling(task, r=3.0, generator=gen(1))
    c = rs.scales["theta"]
    assert (c >= torch.exp(torch.tensor(-3.0))).all() and (c <= torch.exp(torch.tensor(3.0))).all()
    w = rs.init(gen(2))["theta"].requires_grad_()
    empty = Batch(torch.empty(0), torch.empty(0))
    (g_wrapped,) = torch.autograd.grad(rs.loss({"theta": w}, empty), w)
    u = (c * w).detach().requires_grad_()
    (g_plain,) = torch.autograd.grad(task.loss({"theta": u}, empty), u)
    assert torch.allclose(g_wrapped, c * g_plain, rtol=1e-12, atol=0)
    # the scaled problem starts where the plain one does: c * (w0 / c) == w0
    assert torch.allclose(rs.scale({"theta": w.detach()})["theta"], task.init(gen(2))["theta"], rtol=1e-14)


def test_convex_term_minimum_is_at_eta():
    task = quad64()
    cc = ConvexCombination(task, k=20, generator=gen(4))
    p = cc.init(gen(5))
    assert p[CONVEX_KEY].shape == (20,)
    empty = Batch(torch.empty(0), torch.empty(0))
    at_eta = {**p, CONVEX_KEY: cc.eta.clone()}
    assert float(cc.loss(at_eta, empty)) == pytest.approx(float(task.loss(p, empty)), rel=1e-12)
    z = p[CONVEX_KEY].clone().requires_grad_()
    (gz,) = torch.autograd.grad(cc.convex_term(z), z)
    assert torch.allclose(gz, 2 * (z - cc.eta) / 20)
    assert float(cc.convex_term(z.detach())) > 0
    assert cc.evaluate(p)["loss"] == task.evaluate({"theta": p["theta"]})["loss"]


def test_official_convex_term_is_the_authors_clipped_mean_from_zero():
    """style="official" (../shared/specs/hyperadam-official.md): η ~ U(-1, 1), z0 = 0, h = mean(clip((z - η)², 0, 10)),
    so the gradient vanishes on coordinates whose residual is past the clip."""
    task = quad64()
    cc = ConvexCombination(task, k=2000, generator=gen(4), style="official")
    assert cc.eta.min() >= -1 and cc.eta.max() <= 1 and cc.eta.std() == pytest.approx((1 / 3) ** 0.5, rel=0.1)
    p = cc.init(gen(5))
    assert torch.equal(p[CONVEX_KEY], torch.zeros(2000))
    assert float(cc.convex_term(p[CONVEX_KEY])) == pytest.approx(float((cc.eta ** 2).mean()), rel=1e-6)
    z = torch.zeros(2000, dtype=torch.float32)
    z[:1000] = cc.eta[:1000] + 5.0  # residual 25 > 10: clipped
    z.requires_grad_()
    h = cc.convex_term(z)
    (gz,) = torch.autograd.grad(h, z)
    assert float(h) == pytest.approx((1000 * CONVEX_CLIP + float((cc.eta[1000:] ** 2).sum())) / 2000, rel=1e-5)
    assert torch.equal(gz[:1000], torch.zeros(1000))
    assert torch.allclose(gz[1000:], 2 * (z[1000:] - cc.eta[1000:]).detach() / 2000)
    with pytest.raises(ValueError, match="convex style"):
        ConvexCombination(task, k=3, generator=gen(0), style="nope")


def test_gaussian_init_draws_every_parameter_biases_included():
    task = meta_tasks.get_task("quadratic", dim=300)
    wrapped = GaussianInit(task, std=0.1)
    p = wrapped.init(gen(1))
    assert p.keys() == task.init(gen(1)).keys()
    assert float(p["theta"].std()) == pytest.approx(0.1, rel=0.15) and abs(float(p["theta"].mean())) < 0.03
    empty = Batch(torch.empty(0), torch.empty(0))
    assert torch.equal(wrapped.loss(p, empty), task.loss(p, empty))
    assert wrapped.base() is task.base()  # instances still vectorize with the plain task's
    inst = hyperadam_tricks(task, gen(2), init_std=0.1, convex_style="official")
    q = inst.init(gen(3))
    rs = inst.inner.inner  # RS(z) ∘ CC ∘ RS(w) ∘ GaussianInit
    assert isinstance(rs.inner, GaussianInit)
    assert torch.allclose(q["theta"] * rs.scales["theta"], GaussianInit(task, 0.1).init(gen(3))["theta"])
    with pytest.raises(ValueError, match="std"):
        GaussianInit(task, std=0.0)


def test_tricks_compose_with_per_instance_draws():
    task = quad64()
    a, b = hyperadam_tricks(task, gen(7)), hyperadam_tricks(task, gen(8))
    assert set(a.param_shapes()) == {"theta", CONVEX_KEY}
    assert not torch.equal(a.inner.eta, b.inner.eta)  # a = RS(z) ∘ CC ∘ RS(w): per-instance draws
    c2 = a.scales[CONVEX_KEY]
    assert (c2 <= torch.e).all() and (c2 >= 1 / torch.e).all()
    p = a.init(gen(9))
    empty = Batch(torch.empty(0), torch.empty(0))
    cc, rs_w = a.inner, a.inner.inner
    expected = task.loss({"theta": rs_w.scales["theta"] * p["theta"]}, empty) + cc.convex_term(c2 * p[CONVEX_KEY])
    assert torch.allclose(a.loss(p, empty), expected, rtol=1e-12)
    assert a.unwrap() is task
    plain = hyperadam_tricks(task, gen(7), rs_learner=0, convex_k=0)
    assert plain is task


def test_trick_arguments_are_validated():
    task = quad64()
    with pytest.raises(ValueError, match="r"):
        RandomScaling(task, r=-1, generator=gen(0))
    with pytest.raises(ValueError, match="unknown parameter"):
        RandomScaling(task, r=1, generator=gen(0), keys=["nope"])
    with pytest.raises(ValueError, match="k"):
        ConvexCombination(task, k=0, generator=gen(0))


def test_instances_of_one_configuration_vectorize_over_their_draws():
    """K instances sharing a base task run as one vmapped loss over their stacked draws (meta-training's batching)."""
    task = quad64()
    instances = [hyperadam_tricks(task, gen(s)) for s in range(3)]
    assert all(inst.base() is task for inst in instances)
    params = [inst.init(gen(10 + k)) for k, inst in enumerate(instances)]
    stacked_params = {n: torch.stack([p[n] for p in params]) for n in params[0]}
    stacked_draws = {n: torch.stack([inst.draws()[n] for inst in instances]) for n in instances[0].draws()}
    batch = Batch(torch.empty(3, 0), torch.empty(3, 0))
    in_dims = (0, Batch(0, 0, None), 0)  # the batch's dropout seed is None for this task
    batched = torch.func.vmap(lambda p, b, d: instances[0].loss_with(p, b, d), in_dims=in_dims)(
        stacked_params, batch, stacked_draws)
    for k, inst in enumerate(instances):
        single = inst.loss(params[k], Batch(torch.empty(0), torch.empty(0)))
        assert torch.allclose(batched[k], single, rtol=1e-12)


@needs_fmnist
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["mlp-sigmoid", "cnn-1-bn", "cnn-2-dropout", "lstm-sine"])
def test_tasks_on_cuda_with_cuda_generators(name):
    task = meta_tasks.get_task(name, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = task.init(gen)
    assert all(p.device.type == "cuda" for p in params.values())
    batch = task.sample_batch(gen, batch_size=8)
    assert batch.x.device.type == "cuda" and torch.isfinite(task.loss(params, batch))
    assert math.isfinite(task.evaluate(params)["loss"])


@pytest.mark.skipif(not HAVE_FMNIST, reason="needs Fashion-MNIST")
def test_general_family_builds_every_member_with_finite_losses_and_gradients():
    """checkpoints/hyperadam-general's family: every member is drawn, builds, and gives a finite loss and gradient;
    members with the same task name differ in architecture (parameter counts)."""
    fam = meta_tasks.get_family("general")
    drawn = {}
    for s in range(200):
        task = fam.sample(gen(s))
        drawn[id(task)] = task
    assert len(drawn) == len(meta_tasks.GENERAL_MEMBERS)
    sizes = set()
    for task in drawn.values():
        params = {n: p.requires_grad_() for n, p in task.init(gen(0)).items()}
        loss = task.loss(params, task.sample_batch(gen(1)))
        grads = torch.autograd.grad(loss, list(params.values()))
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads), task.name
        sizes.add((task.name, sum(p.numel() for p in params.values())))
    assert len(sizes) == len(meta_tasks.GENERAL_MEMBERS)
