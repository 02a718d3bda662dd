"""Devices and precision: autocast training on the CPU (bf16), the fp16 loss scaler's checkpointing, the
decisions that only matter on a GPU (tested with device names, no GPU needed), and the background-thread
batch stream."""

import json
import math

import pytest
import torch

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.data import toy_sampler
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import CHECKPOINT_NAME, TrainConfig, Trainer, check_precision, execution
from ot_cfm.training.batches import CoupledBatches, coupled_batch_stream, overlap_mode, to_device


def make_trainer(folder=None, **overrides):
    torch.manual_seed(0)  # model initialisation only
    config = dict(out_dir=None if folder is None else str(folder), steps=60, batch_size=64, lr=1e-2,
                  log_every=10, checkpoint_every=25, progress=False, workers=0, threads=1, grad_clip=1.0)
    config.update(overrides)
    return Trainer(MLP(2, width=32, depth=2), ConditionalFlowMatcher(coupler=ExactOTCoupler()), toy_sampler("8gaussians"),
                   toy_sampler("moons"), TrainConfig(**config))


def weights(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_bf16_autocasts_the_forward_and_trains(tmp_path):
    bf16 = make_trainer(precision="bf16", log_every=1)
    dtypes = []
    linear = next(m for m in bf16.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    result = bf16.fit()
    assert set(dtypes) == {torch.bfloat16}  # the forward really ran in bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert all(v.dtype == torch.float32 for s in bf16.optimizer.state.values() for v in s.values() if v.dim())
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 60 and all(map(math.isfinite, losses))
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:5]) / 5
    fp32 = make_trainer()
    fp32.fit()
    assert not torch.equal(weights(bf16), weights(fp32))  # the same run in float32 ends elsewhere


def test_bf16_resume_is_exact(tmp_path):
    full = make_trainer(tmp_path / "full", precision="bf16")
    full.fit()
    cut = make_trainer(tmp_path / "cut", precision="bf16", steps=25)
    cut.fit()
    resumed = make_trainer(tmp_path / "cut", precision="bf16")
    resumed.fit(resume=True)
    assert resumed.step == 60
    torch.testing.assert_close(weights(resumed), weights(full), rtol=0, atol=0)


def test_precision_is_in_the_fingerprint_only_when_not_fp32(tmp_path):
    assert "precision" not in make_trainer()._fingerprint()["config"]  # fp32 checkpoints of earlier versions resume
    assert make_trainer(precision="bf16")._fingerprint()["config"]["precision"] == "bf16"
    make_trainer(tmp_path / "run", precision="bf16", steps=5).fit()
    with pytest.raises(ValueError, match="config.precision: checkpoint 'bf16' vs now 'fp32'"):
        make_trainer(tmp_path / "run", steps=10).fit(resume=True)
    make_trainer(tmp_path / "fp32", steps=5).fit()
    with pytest.raises(ValueError, match="config.precision"):
        make_trainer(tmp_path / "fp32", precision="bf16", steps=10).fit(resume=True)


def test_fp16_is_refused_on_the_cpu_and_unknown_precisions_everywhere():
    with pytest.raises(ValueError, match="'fp16' needs a GPU.*use 'bf16'"):
        make_trainer(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    check_precision("fp16", "cuda:0")  # allowed wherever a GPU runs it
    with pytest.raises(ValueError, match="needs a GPU"):
        check_precision("fp16", torch.device("cpu"))


@pytest.mark.filterwarnings("error::UserWarning")  # a step skipped on inf gradients warns of nothing
def test_fp16_loss_scaler_is_checkpointed_and_resume_is_exact(tmp_path, monkeypatch):
    # The fp16 path, run on the CPU (whose autocast supports float16) by lifting the refusal for this test.
    monkeypatch.setattr(execution, "_FP16_REFUSED_ON", frozenset())
    full = make_trainer(tmp_path / "full", precision="fp16")
    full.fit()
    assert full.scaler is not None and full.scaler.get_scale() > 0
    cut = make_trainer(tmp_path / "cut", precision="fp16", steps=25)
    cut.fit()
    saved = torch.load(tmp_path / "cut" / CHECKPOINT_NAME, weights_only=True)["scaler"]
    assert saved["scale"] == cut.scaler.get_scale() and saved["_growth_tracker"] > 0
    resumed = make_trainer(tmp_path / "cut", precision="fp16")
    assert resumed.scaler.state_dict()["_growth_tracker"] == 0
    resumed.load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)
    assert resumed.scaler.state_dict() == saved  # restored, not started afresh
    resumed = make_trainer(tmp_path / "cut", precision="fp16")
    resumed.fit(resume=True)
    assert resumed.scaler.get_scale() == full.scaler.get_scale()
    torch.testing.assert_close(weights(resumed), weights(full), rtol=0, atol=0)


def test_exact_coupler_couples_on_the_cpu_and_others_on_the_model_device():
    exact = Trainer(MLP(2, width=8, depth=1), ConditionalFlowMatcher(coupler=ExactOTCoupler()),
                    toy_sampler("gaussian"), toy_sampler("moons"), TrainConfig(steps=1, progress=False))
    assert exact.coupling_device.type == "cpu" and exact.batches().device.type == "cpu"
    from ot_cfm.couplers.sinkhorn import SinkhornCoupler

    sinkhorn = Trainer(MLP(2, width=8, depth=1), ConditionalFlowMatcher(coupler=SinkhornCoupler()),
                       toy_sampler("gaussian"), toy_sampler("moons"), TrainConfig(steps=1, progress=False))
    assert sinkhorn.coupling_device == sinkhorn.device  # Sinkhorn runs on the model's device


@pytest.mark.parametrize("device, workers, coupling, mode", [
    ("cpu", 0, "cpu", "inline"),        # as before: a thread would compete with the step for the cores
    ("cpu", 3, "cpu", "workers"),
    ("cuda", 0, "cpu", "thread"),       # exact coupling overlapped with the queued GPU step
    ("cuda:1", 2, "cpu", "workers"),
    ("cuda", 0, "cuda", "inline"),      # a coupler on the GPU: no CPU work to overlap
])
def test_overlap_mode(device, workers, coupling, mode):
    assert overlap_mode(device, workers, coupling) == mode


def test_to_device_on_the_cpu_returns_the_same_tensors():
    batch = (torch.randn(4, 2), torch.randn(4, 2), torch.arange(4))
    assert all(a is b for a, b in zip(to_device(batch, "cpu"), batch))


def test_threaded_stream_equals_the_inline_stream_and_stops_when_closed():
    calls = []
    sampler = toy_sampler("moons")

    def target(n, generator):
        calls.append(n)
        return sampler(n, generator)

    batches = CoupledBatches(toy_sampler("gaussian"), target, ConditionalFlowMatcher(coupler=ExactOTCoupler()).couple,
                             32, seed=3)
    inline = list(coupled_batch_stream(batches, range(5, 12)))
    threaded = list(coupled_batch_stream(batches, range(5, 12), thread=True, prefetch=2))
    assert len(threaded) == 7
    for a, b in zip(inline, threaded):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    calls.clear()
    stream = coupled_batch_stream(batches, range(0, 1000), thread=True, prefetch=2)
    next(stream)
    stream.close()
    assert len(calls) <= 4  # the batch taken, at most prefetch + 1 computed ahead, none after closing


def test_threaded_stream_raises_a_batch_error_at_that_batch():
    def target(n, generator):
        raise ValueError("broken sampler")

    stream = coupled_batch_stream(CoupledBatches(toy_sampler("gaussian"), target, None, 8, seed=0), range(3),
                                  thread=True)
    with pytest.raises(ValueError, match="broken sampler"):
        next(stream)


# --- the command line ---------------------------------------------------------------------------------------

TINY = ["train", "--steps", "10", "--batch-size", "32", "--width", "16", "--eval-samples", "100", "--workers", "0",
        "--no-progress"]


def test_cli_trains_in_bf16_on_the_cpu_and_records_it(tmp_path):
    from ot_cfm.cli import main

    out = tmp_path / "run"
    assert main([*TINY, "--device", "cpu", "--precision", "bf16", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == "cpu" and metrics["precision"] == "bf16"
    assert math.isfinite(metrics["final_loss"])
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["fingerprint"]["config"]["precision"] == "bf16"
    assert main(["sample", str(out / CHECKPOINT_NAME), "--device", "cpu", "--n", "20", "--solver", "euler",
                 "--out", str(tmp_path / "s")]) == 0
    # the default precision is recorded too, and fp32 runs keep their earlier fingerprint
    assert main([*TINY, "--device", "cpu", "--out", str(tmp_path / "fp32")]) == 0
    assert json.loads((tmp_path / "fp32" / "metrics.json").read_text())["precision"] == "fp32"


def test_cli_array_and_image_runs_take_device_and_precision(tmp_path):
    import numpy as np

    from ot_cfm.cli import main

    rows = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    out = tmp_path / "arrays"
    assert main([*TINY, "--data", str(tmp_path / "rows.npy"), "--device", "cpu", "--precision", "bf16",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["device"], metrics["precision"]) == ("cpu", "bf16")
    assert main(["train", "--dataset", "digits", "--device", "cpu", "--precision", "fp16", "--out",
                 str(tmp_path / "img")]) == 2  # refused before the data is read


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    from ot_cfm.cli import main

    assert main([*TINY, "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["sample", str(tmp_path / "missing.pt"), "--device", "cuda:1"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cli_fp16_on_the_cpu_is_a_clear_error(tmp_path, capsys):
    from ot_cfm.cli import main

    assert main([*TINY, "--device", "cpu", "--precision", "fp16", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--precision fp16 --device cpu" in err and "use 'bf16'" in err


def test_cli_device_names(monkeypatch):
    from ot_cfm.cli import build_parser
    from ot_cfm.cli.common import resolve_device

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--device", "gpu"])
    assert build_parser().parse_args(["train", "--device", "cuda:1"]).device == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="1 CUDA device"):
        resolve_device("cuda:1")
