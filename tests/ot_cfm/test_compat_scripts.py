"""torchcfm's example scripts on the drop-in, call for call.

Each script below makes the imports, calls and arguments of one of torchcfm's examples (repository
atong01/conditional-flow-matching: the 2D tutorials, the MNIST notebooks, examples/images/cifar10's
training scripts and compute_fid.py), in their order, at tiny sizes on the CPU, with ``PKG`` for the package:
it runs once with ``torchcfm`` and once with ``ot_cfm.compat.torchcfm`` from the same seeds, and the outputs
(losses, weights, trajectories, images) must be equal, bit for bit. Where a script re-pairs the batch with
exact OT, the drop-in uses the optimal permutation by design; there the drop-in with ``replace=True`` (torchcfm's
sampling, its documented switch) must reproduce torchcfm's run, and the drop-in as it is must pair every batch
by an optimal permutation.

Stand-ins for what does not load in this environment: random tensors for torchvision's datasets, and
``NeuralODE`` below for torchdyn.core's (whose import loads torchvision). train_cifar10_ddp.py makes the
torchcfm calls of train_cifar10.py (the same model, matchers and step; only its process group and sampler
differ), so the CIFAR-10 scripts below stand for both.
"""

import functools
import textwrap
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import ot
import pytest
import torch
import torchdiffeq

import ot_cfm.compat.torchcfm.optimal_transport as our_ot


class NeuralODE(torch.nn.Module):
    """Stand-in for torchdyn.core.NeuralODE: ``trajectory(x, t_span)`` is torchdiffeq's ``odeint`` of the field
    f(t, x) with the same solver, tolerances and time grid (the states at t_span, (T, *x.shape))."""

    def __init__(self, field, solver="dopri5", sensitivity="autograd", atol=1e-3, rtol=1e-3):
        super().__init__()
        self.field, self.solver, self.atol, self.rtol = field, solver, atol, rtol

    def trajectory(self, x, t_span):
        return torchdiffeq.odeint(self.field, x, t_span, method=self.solver, atol=self.atol, rtol=self.rtol)


@dataclass(frozen=True)
class Script:
    """A torchcfm example's calls: ``source`` with PKG for the package, the names whose values must be equal, and
    whether it re-pairs batches with exact OT."""

    name: str
    source: str
    outputs: tuple
    repairs: bool

    def run(self, package: str, **namespace) -> dict:
        """The script's namespace after running it on ``package`` from seed 0 (torch and numpy)."""
        torch.manual_seed(0)
        np.random.seed(0)
        namespace = {"NeuralODE": NeuralODE, **namespace}
        exec(textwrap.dedent(self.source).replace("PKG", package), namespace)
        plt.close("all")
        return namespace


FLOW_MATCHING_TUTORIAL = Script("2D_tutorials/Flow_matching_tutorial", """
    import numpy as np
    import torch

    from PKG.conditional_flow_matching import *
    from PKG.models.models import *
    from PKG.utils import *

    def sample_conditional_pt(x0, x1, t, sigma):
        t = t.reshape(-1, *([1] * (x0.dim() - 1)))
        return t * x1 + (1 - t) * x0 + sigma * torch.randn_like(x0)

    def train(ot_sampler=None):
        model = MLP(dim=2, time_varying=True)
        optimizer = torch.optim.Adam(model.parameters())
        losses = []
        for k in range(3):
            optimizer.zero_grad()
            x0 = sample_8gaussians(32)
            x1 = sample_moons(32)
            if ot_sampler is not None:
                x0, x1 = ot_sampler.sample_plan(x0, x1)
            t = torch.rand(x0.shape[0]).type_as(x0)
            xt = sample_conditional_pt(x0, x1, t, sigma=0.01)
            ut = x1 - x0
            vt = model(torch.cat([xt, t[:, None]], dim=-1))
            loss = torch.mean((vt - ut) ** 2)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        node = NeuralODE(torch_wrapper(model), solver="dopri5", sensitivity="adjoint", atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            traj = node.trajectory(sample_8gaussians(64), t_span=torch.linspace(0, 1, 10))
            plot_trajectories(traj.cpu().numpy())
        return model, losses, traj

    cfm_model, cfm_losses, cfm_traj = train()

    from PKG.optimal_transport import OTPlanSampler

    ot_sampler = OTPlanSampler(method="exact")
    FM = ConditionalFlowMatcher(sigma=0.1)
    ot_model, ot_losses, ot_traj = train(ot_sampler)
    """, ("cfm_model", "cfm_losses", "cfm_traj", "ot_model", "ot_losses", "ot_traj"), repairs=True)

MINIBATCH_OT_TUTORIAL = Script("2D_tutorials/The_unreasonable_performance_of_minibatch_OT", """
    import numpy as np
    import ot
    import torch

    from PKG.conditional_flow_matching import *
    from PKG.models.models import *
    from PKG.optimal_transport import OTPlanSampler
    from PKG.utils import *

    x0 = sample_8gaussians(64)
    x1 = sample_moons(64)
    M = torch.cdist(x0, x1) ** 2
    ot_sampler = OTPlanSampler(method="exact")
    plans = [ot_sampler.get_map(x0, x1)]

    # the notebook's incomplete minibatch plan: the mean of exact plans between random sub-batches
    for batch_size in (16, 8):
        plan = np.zeros((64, 64))
        for _ in range(5):
            i = np.random.choice(64, batch_size, replace=False)
            j = np.random.choice(64, batch_size, replace=False)
            plan[np.ix_(i, j)] += ot.emd(ot.unif(batch_size), ot.unif(batch_size), M.numpy()[i][:, j].copy())
        plans.append(plan / 5)

    def train(plan, ot_sampler):
        model = MLP(dim=2, time_varying=True)
        optimizer = torch.optim.Adam(model.parameters())
        FM = ConditionalFlowMatcher(sigma=0.1)
        losses = []
        for k in range(3):
            optimizer.zero_grad()
            indices_i, indices_j = ot_sampler.sample_map(plan, batch_size=16, replace=False)
            t, xt, ut = FM.sample_location_and_conditional_flow(x0[indices_i], x1[indices_j])
            vt = model(torch.cat([xt, t[:, None]], dim=-1))
            loss = torch.mean((vt - ut) ** 2)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return model, losses

    runs = [train(plan, OTPlanSampler(method="exact")) for plan in plans]
    entropic_plans = [OTPlanSampler(method="sinkhorn", reg=reg).get_map(x0, x1) for reg in (1, 10, 100)]
    """, ("plans", "runs"), repairs=False)

CNF_TUTORIAL = Script("2D_tutorials/Maximum_likelihood_CNF_tutorial", """
    import torch
    from torch.distributions import MultivariateNormal

    from PKG.models import MLP
    from PKG.utils import plot_trajectories, sample_moons

    class torch_wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, t, x, *args, **kwargs):
            return self.model(torch.cat([x, t.repeat(x.shape[0])[:, None]], 1))

    class cnf_wrapper(torch.nn.Module):
        # the field and its exact divergence, d/dt [x, log p] = [v, div v]
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, t, x, *args, **kwargs):
            x = x[..., :-1]
            field = lambda y: self.model(torch.cat([y, t.reshape(1)]))
            div = torch.vmap(lambda y: torch.trace(torch.func.jacrev(field)(y)))(x)
            dx = self.model(torch.cat([x, t.repeat(x.shape[0])[:, None]], 1))
            return torch.cat([dx, div[:, None]], dim=-1)

    model = MLP(dim=2, time_varying=True)
    prior = MultivariateNormal(torch.zeros(2), torch.eye(2))
    optimizer = torch.optim.Adam(model.parameters())
    steps = 4
    cnf = NeuralODE(cnf_wrapper(model), solver="euler", sensitivity="adjoint")
    node = NeuralODE(torch_wrapper(model), solver="euler", sensitivity="adjoint")
    losses = []
    for k in range(2):
        optimizer.zero_grad()
        x1 = sample_moons(16)
        x1_with_ll = torch.cat([x1, torch.zeros(16, 1)], dim=-1)
        x0_with_ll = cnf.trajectory(x1_with_ll, t_span=torch.linspace(1, 0, steps + 1))[-1]
        loss = -torch.mean(prior.log_prob(x0_with_ll[..., :-1]) + x0_with_ll[..., -1])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        traj = node.trajectory(torch.randn(32, 2), t_span=torch.linspace(0, 1, steps + 1))
        plot_trajectories(traj.cpu().numpy())
    """, ("model", "losses", "traj"), repairs=False)

SF2M_TUTORIAL = Script("2D_tutorials/SF2M_tutorial", """
    import torch
    import torchsde

    from PKG.conditional_flow_matching import *
    from PKG.models import MLP
    from PKG.utils import sample_8gaussians, sample_moons, torch_wrapper

    sigma = 1.0
    model = MLP(dim=2, time_varying=True, w=64)
    score_model = MLP(dim=2, time_varying=True, w=64)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(score_model.parameters()), 0.01)
    FM = SchrodingerBridgeConditionalFlowMatcher(sigma=sigma)
    losses = []
    for i in range(3):
        optimizer.zero_grad()
        x0 = sample_8gaussians(32)
        x1 = sample_moons(32)
        t, xt, ut, eps = FM.sample_location_and_conditional_flow(x0, x1, return_noise=True)
        lambda_t = FM.compute_lambda(t)
        vt = model(torch.cat([xt, t[:, None]], dim=-1))
        st = score_model(torch.cat([xt, t[:, None]], dim=-1))
        loss = torch.mean((vt - ut) ** 2) + torch.mean((lambda_t[:, None] * st + eps) ** 2)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    node = NeuralODE(torch_wrapper(model), solver="euler", sensitivity="adjoint", atol=1e-4, rtol=1e-4)
    x0 = sample_8gaussians(64)
    with torch.no_grad():
        traj = node.trajectory(x0, t_span=torch.linspace(0, 1, 10))

    class SDE(torch.nn.Module):
        # dx = [v + s] dt + sigma dW on [x, t] inputs, the notebook's drift and diffusion
        noise_type = "diagonal"
        sde_type = "ito"

        def f(self, t, y):
            z = torch.cat([y, t.repeat(y.shape[0])[:, None]], 1)
            return model(z) + score_model(z)

        def g(self, t, y):
            return torch.ones_like(y) * sigma

    with torch.no_grad():
        sde_traj = torchsde.sdeint(SDE(), x0, ts=torch.linspace(0, 1, 10), dt=0.05)
    """, ("model", "score_model", "losses", "traj", "sde_traj"), repairs=True)

MNIST_EXAMPLE = Script("images/mnist_example", """
    import torch
    import torchsde

    from PKG.conditional_flow_matching import *
    from PKG.models.unet import UNetModel

    device = torch.device("cpu")
    train_loader = [(torch.rand(4, 1, 28, 28) * 2 - 1, torch.randint(10, (4,)))]

    # OT-CFM
    model = UNetModel(dim=(1, 28, 28), num_channels=32, num_res_blocks=1).to(device)
    optimizer = torch.optim.Adam(model.parameters())
    FM = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    node = NeuralODE(model, solver="dopri5", sensitivity="adjoint", atol=1e-4, rtol=1e-4)
    losses = []
    for i, data in enumerate(train_loader):
        optimizer.zero_grad()
        x1 = data[0].to(device)
        x0 = torch.randn_like(x1)
        t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)
        vt = model(t, xt)
        loss = torch.mean((vt - ut) ** 2)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        traj = node.trajectory(torch.randn(2, 1, 28, 28, device=device), t_span=torch.linspace(0, 1, 2, device=device))

    # SF2M
    sigma = 0.1
    model = UNetModel(dim=(1, 28, 28), num_channels=32, num_res_blocks=1).to(device)
    score_model = UNetModel(dim=(1, 28, 28), num_channels=32, num_res_blocks=1).to(device)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(score_model.parameters()))
    FM = SchrodingerBridgeConditionalFlowMatcher(sigma=sigma)
    for i, data in enumerate(train_loader):
        optimizer.zero_grad()
        x1 = data[0].to(device)
        x0 = torch.randn_like(x1)
        t, xt, ut, eps = FM.sample_location_and_conditional_flow(x0, x1, return_noise=True)
        lambda_t = FM.compute_lambda(t)
        vt = model(t, xt)
        st = score_model(t, xt)
        loss = torch.mean((vt - ut) ** 2) + torch.mean((lambda_t[:, None, None, None] * st + eps) ** 2)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    class SDE(torch.nn.Module):
        noise_type = "diagonal"
        sde_type = "ito"

        def f(self, t, y):
            y = y.view(-1, 1, 28, 28)
            return model(t, y).flatten(start_dim=1) + score_model(t, y).flatten(start_dim=1)

        def g(self, t, y):
            return torch.ones_like(y) * sigma

    with torch.no_grad():
        sde_traj = torchsde.sdeint(SDE(), torch.randn(2, 28 * 28, device=device),
                                   ts=torch.linspace(0, 1, 2, device=device), dt=1.0)
    """, ("losses", "traj", "model", "score_model", "sde_traj"), repairs=True)

CONDITIONAL_MNIST = Script("images/conditional_mnist", """
    import torch
    import torchdiffeq

    from PKG.conditional_flow_matching import *
    from PKG.models.unet import UNetModel

    device = torch.device("cpu")
    train_loader = [(torch.rand(4, 1, 28, 28) * 2 - 1, torch.randint(10, (4,)))]
    generated_class_list = torch.arange(2, device=device)

    def generate(model):
        with torch.no_grad():
            return torchdiffeq.odeint(lambda t, x: model.forward(t, x, generated_class_list),
                                      torch.randn(2, 1, 28, 28, device=device), torch.linspace(0, 1, 2, device=device),
                                      atol=1e-4, rtol=1e-4, method="dopri5")

    def unet():
        return UNetModel(dim=(1, 28, 28), num_channels=32, num_res_blocks=1, num_classes=10, class_cond=True).to(device)

    # class-conditional CFM
    model = unet()
    optimizer = torch.optim.Adam(model.parameters())
    FM = ConditionalFlowMatcher(sigma=0.0)
    losses = []
    for i, data in enumerate(train_loader):
        optimizer.zero_grad()
        x1, y = data[0].to(device), data[1].to(device)
        x0 = torch.randn_like(x1)
        t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)
        vt = model(t, xt, y)
        loss = torch.mean((vt - ut) ** 2)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    cfm_traj = generate(model)

    # OT-CFM, labels carried through the pairing
    model = unet()
    optimizer = torch.optim.Adam(model.parameters())
    FM = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    for i, data in enumerate(train_loader):
        optimizer.zero_grad()
        x1, y = data[0].to(device), data[1].to(device)
        x0 = torch.randn_like(x1)
        t, xt, ut, _, y1 = FM.guided_sample_location_and_conditional_flow(x0, x1, y1=y)
        vt = model(t, xt, y1)
        loss = torch.mean((vt - ut) ** 2)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    ot_traj = generate(model)

    # SF2M
    model, score_model = unet(), unet()
    optimizer = torch.optim.Adam(list(model.parameters()) + list(score_model.parameters()))
    FM = SchrodingerBridgeConditionalFlowMatcher(sigma=0.1)
    for i, data in enumerate(train_loader):
        optimizer.zero_grad()
        x1, y = data[0].to(device), data[1].to(device)
        x0 = torch.randn_like(x1)
        t, xt, ut, _, y1, eps = FM.guided_sample_location_and_conditional_flow(x0, x1, y1=y, return_noise=True)
        lambda_t = FM.compute_lambda(t)
        vt = model(t, xt, y1)
        st = score_model(t, xt, y1)
        loss = torch.mean((vt - ut) ** 2) + torch.mean((lambda_t[:, None, None, None] * st + eps) ** 2)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    sb_traj = generate(model)
    """, ("losses", "cfm_traj", "ot_traj", "sb_traj", "model", "score_model"), repairs=True)

# examples/images/cifar10/train_cifar10.py with its flags as variables (num_channel 32, two steps, warmup 1 and
# lr 1e-2 so that the second step moves the weights); generate_samples integrates 1 image over 3 Euler points
TRAIN_CIFAR10 = """
    import copy
    import os

    import torch

    from PKG.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
        TargetConditionalFlowMatcher,
        VariancePreservingConditionalFlowMatcher,
    )
    from PKG.models.unet.unet import UNetModelWrapper

    device = torch.device("cpu")
    num_channel, lr, grad_clip, total_steps, warmup, batch_size, ema_decay, save_step = 32, 1e-2, 1.0, 2, 1, 2, 0.9, 1
    datalooper = iter([torch.rand(batch_size, 3, 32, 32) * 2 - 1 for _ in range(total_steps)])

    def ema(source, target, decay):
        target_state = target.state_dict()
        for key, value in source.state_dict().items():
            target_state[key].data.copy_(target_state[key].data * decay + value.data * (1 - decay))

    def generate_samples(model):
        model.eval()
        node = NeuralODE(copy.deepcopy(model), solver="euler", sensitivity="adjoint")
        with torch.no_grad():
            traj = node.trajectory(torch.randn(1, 3, 32, 32, device=device), t_span=torch.linspace(0, 1, 3, device=device))
        model.train()
        return traj[-1].view([-1, 3, 32, 32]).clip(-1, 1) / 2 + 0.5

    net_model = UNetModelWrapper(
        dim=(3, 32, 32),
        num_res_blocks=2,
        num_channels=num_channel,
        channel_mult=[1, 2, 2, 2],
        num_heads=4,
        num_head_channels=64,
        attention_resolutions="16",
        dropout=0.1,
    ).to(device)
    ema_model = copy.deepcopy(net_model)
    optim = torch.optim.Adam(net_model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=lambda step: min(step, warmup) / warmup)
    FM = {"otcfm": ExactOptimalTransportConditionalFlowMatcher, "icfm": ConditionalFlowMatcher,
          "fm": TargetConditionalFlowMatcher, "si": VariancePreservingConditionalFlowMatcher}[model_name](sigma=0.0)
    losses, samples = [], []
    for step in range(total_steps):
        optim.zero_grad()
        x1 = next(datalooper).to(device)
        x0 = torch.randn_like(x1)
        t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)
        vt = net_model(t, xt)
        loss = torch.mean((vt - ut) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net_model.parameters(), grad_clip)
        optim.step()
        sched.step()
        ema(net_model, ema_model, ema_decay)
        losses.append(loss.item())
        if save_step > 0 and step % save_step == 0:
            samples += [generate_samples(net_model), generate_samples(ema_model)]
            torch.save({"net_model": net_model.state_dict(), "ema_model": ema_model.state_dict(),
                        "sched": sched.state_dict(), "optim": optim.state_dict(), "step": step},
                       os.path.join(savedir, f"{model_name}_cifar10_weights_step_{step}.pt"))
    """

CIFAR10 = [Script(f"images/cifar10/train_cifar10 --model {model}", f"model_name = {model!r}\n" + textwrap.dedent(TRAIN_CIFAR10),
                  ("losses", "samples", "net_model", "ema_model"), repairs=model == "otcfm")
           for model in ("otcfm", "icfm", "fm", "si")]

# examples/images/cifar10/compute_fid.py: the model of the training script, its EMA weights loaded (with the
# "module." prefix of a DataParallel checkpoint stripped when loading fails), then one batch generated by
# torchdiffeq's dopri5 and turned into 8-bit images
COMPUTE_FID = Script("images/cifar10/compute_fid", """
    import torch
    from torchdiffeq import odeint

    from PKG.models.unet.unet import UNetModelWrapper

    device = torch.device("cpu")
    new_net = UNetModelWrapper(
        dim=(3, 32, 32),
        num_res_blocks=2,
        num_channels=32,
        channel_mult=[1, 2, 2, 2],
        num_heads=4,
        num_head_channels=64,
        attention_resolutions="16",
        dropout=0.1,
    ).to(device)
    checkpoint = torch.load(PATH, map_location=device)
    state_dict = checkpoint["ema_model"]
    try:
        new_net.load_state_dict(state_dict)
    except RuntimeError:
        new_net.load_state_dict({k[7:]: v for k, v in state_dict.items()})
    new_net.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32, device=device)
        traj = odeint(new_net, x, torch.linspace(0, 1, 2, device=device), rtol=1e-3, atol=1e-3, method="dopri5")
    img = (traj[-1, :] * 127.5 + 128).clip(0, 255).to(torch.uint8)
    """, ("img",), repairs=False)

SCRIPTS = [FLOW_MATCHING_TUTORIAL, MINIBATCH_OT_TUTORIAL, CNF_TUTORIAL, SF2M_TUTORIAL, MNIST_EXAMPLE, CONDITIONAL_MNIST,
           *CIFAR10]


def _same(a, b) -> bool:
    """Equal, bit for bit: tensors, arrays, modules (their weights) and lists or dicts of them."""
    if isinstance(a, torch.nn.Module):
        a, b = a.state_dict(), b.state_dict()
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _finite(a) -> bool:
    """No NaN or infinity in a tensor, number, module (its weights) or list of them."""
    if isinstance(a, torch.nn.Module):
        a = list(a.state_dict().values())
    if isinstance(a, (list, tuple)):
        return all(map(_finite, a))
    return bool(torch.isfinite(torch.as_tensor(a)).all())


@pytest.fixture
def with_replacement(monkeypatch):
    """The drop-in's OTPlanSampler drawing its pairs with replacement (``replace=True``), as torchcfm's does."""
    for name in ("sample_plan", "sample_plan_with_labels"):
        method = functools.partialmethod(getattr(our_ot.OTPlanSampler, name), replace=True)
        monkeypatch.setattr(our_ot.OTPlanSampler, name, method)


@pytest.fixture
def repairings(monkeypatch):
    """The drop-in's re-pairings during a test: (x0, x1, paired x0, paired x1) for each sample_plan(_with_labels) call."""
    calls = []
    for name in ("sample_plan", "sample_plan_with_labels"):
        def spy(self, x0, x1, *args, _original=getattr(our_ot.OTPlanSampler, name), **kwargs):
            out = _original(self, x0, x1, *args, **kwargs)
            calls.append((x0, x1, out[0], out[1]))
            return out
        monkeypatch.setattr(our_ot.OTPlanSampler, name, spy)
    return calls


def _script_id(script):
    return script.name


@pytest.mark.parametrize("script", SCRIPTS, ids=_script_id)
def test_script_gives_torchcfm_outputs(script, tmp_path, request):
    if script.repairs:  # the drop-in's documented switch to torchcfm's sampling of the exact plan
        request.getfixturevalue("with_replacement")
    theirs = script.run("torchcfm", savedir=str(tmp_path))
    ours = script.run("ot_cfm.compat.torchcfm", savedir=str(tmp_path))
    for name in script.outputs:
        assert _same(theirs[name], ours[name]), f"{script.name}: {name} differs from torchcfm's"


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.repairs], ids=_script_id)
def test_script_pairs_each_batch_by_an_optimal_permutation(script, tmp_path, repairings):
    """As it is, the drop-in pairs every x0, in its order, with its partner in an optimal permutation of x1."""
    ours = script.run("ot_cfm.compat.torchcfm", savedir=str(tmp_path))
    assert repairings, f"{script.name} never re-paired a batch"
    for x0, x1, p0, p1 in repairings:
        a, b = x0.reshape(len(x0), -1).double(), x1.reshape(len(x1), -1).double()
        j = torch.cdist(p1.reshape(len(p1), -1).double(), b).argmin(1)
        assert torch.equal(p0, x0) and torch.equal(p1, x1[j]) and sorted(j.tolist()) == list(range(len(x1)))
        cost = torch.cdist(a, b) ** 2
        optimum = ot.emd2(ot.unif(len(a)), ot.unif(len(b)), cost.numpy())
        assert cost[torch.arange(len(a)), j].mean().item() == pytest.approx(optimum, rel=1e-9)
    assert all(_finite(ours[name]) for name in script.outputs)


def test_minibatch_ot_tutorial_entropic_plans_are_pots():
    """The tutorial's Sinkhorn plans (reg 1, 10, 100): ot-cfm's log-domain Sinkhorn against POT's, to 1e-6 of the mass."""
    theirs = MINIBATCH_OT_TUTORIAL.run("torchcfm")
    ours = MINIBATCH_OT_TUTORIAL.run("ot_cfm.compat.torchcfm")
    for p, q in zip(theirs["entropic_plans"], ours["entropic_plans"]):
        np.testing.assert_allclose(q, p, rtol=0, atol=1e-6 * p.sum())


@pytest.mark.parametrize("prefix", ["", "module."])
def test_compute_fid_loads_a_trained_checkpoint_and_samples_as_torchcfm(prefix, tmp_path):
    """compute_fid on a checkpoint of the CIFAR-10 script trained by torchcfm, saved as is or with DataParallel's
    "module." prefix: the drop-in loads it and generates torchcfm's images."""
    icfm = next(s for s in CIFAR10 if s.name.endswith("icfm"))
    trained = icfm.run("torchcfm", savedir=str(tmp_path))
    checkpoint = {"ema_model": {prefix + k: v for k, v in trained["ema_model"].state_dict().items()}}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    theirs = COMPUTE_FID.run("torchcfm", PATH=str(tmp_path / "checkpoint.pt"))
    ours = COMPUTE_FID.run("ot_cfm.compat.torchcfm", PATH=str(tmp_path / "checkpoint.pt"))
    assert torch.equal(theirs["img"], ours["img"])
    assert (ours["traj"][-1] - ours["x"]).abs().max() > 1e-3  # the trained field moved the noise
