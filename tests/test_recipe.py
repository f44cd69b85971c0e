"""The training recipe: the default optimizer, --lr-schedule with warm-up, and --mixup (issue 14)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from p2ch import trainer, training
from p2ch.checkpoint import load_checkpoint
from p2ch.config import SegTrainingConfig, TrainingConfig, config_from_args
from p2ch.errors import ConfigError
from p2ch.trainer import LrPlan, check_horizon, make_optimizer, make_scheduler, plan_schedule
from p2ch.training import get_args_parser, mix_batch, sample_beta

BATCH = 4
STEPS = 2  # training batches per epoch in the end-to-end runs


@pytest.fixture(scope="module")
def tiny(synth_set):
    return synth_set(num_cts=4, size=96, slices=48, candidates_per_ct=40, nodules_per_ct=2, seed=11)


def _args(root: Path, work: Path, *extra: str) -> list[str]:
    return [
        "--data-root", str(root), "--cache-dir", str(root.parent / "cache-recipe"), "--runs-dir", str(work / "runs"),
        "--checkpoint-dir", str(work / "models"), "--batch-size", str(BATCH), "--num-workers", "0",
        "--images-every", "0", "--val-fraction", "0.5", "--log-level", "WARNING", "--max-train-batches", str(STEPS),
        "--max-val-batches", "1", "--balanced", *extra,
    ]  # fmt: skip


def _last(work: Path) -> Path:
    (run,) = (work / "models" / "p2ch").iterdir()
    return run / "last.pt"


@pytest.fixture
def lrs(monkeypatch) -> list[float]:
    """The lr of every optimizer step of the runs in the test, in order."""
    seen: list[float] = []
    step = trainer.TrainingRun.optimizer_step

    def recording(self, loss):
        seen.append(self.optimizer.param_groups[0]["lr"])
        step(self, loss)

    monkeypatch.setattr(trainer.TrainingRun, "optimizer_step", recording)
    return seen


def _config(*flags: str) -> TrainingConfig:
    return config_from_args(get_args_parser().parse_args(list(flags)), TrainingConfig)


# -- the default recipe and the book's -------------------------------------------------------------


BOOK_RECIPE = ("--optimizer", "sgd", "--lr", "0.001", "--momentum", "0.99", "--lr-schedule", "constant")


def test_the_default_is_adam_one_cycle_at_width_16_and_the_books_recipe_is_one_flag_set_away():
    model = torch.nn.Linear(3, 2)
    config = _config()
    default = make_optimizer(model, config)
    assert isinstance(default, torch.optim.Adam)
    assert default.param_groups[0]["lr"] == 3e-3 and default.param_groups[0]["weight_decay"] == 0.0
    assert (config.lr_schedule, config.model_width) == ("onecycle", 16)
    book_config = _config(*BOOK_RECIPE, "--model-width", "8")
    book = make_optimizer(model, book_config)
    assert isinstance(book, torch.optim.SGD)
    group = book.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (1e-3, 0.99, 0.0, False)
    assert make_scheduler(book, plan_schedule(book_config, 10, 32)) is None  # a constant lr, as the book's
    assert _config("--optimizer", "sgd").momentum == 0.99  # the book's momentum stays the default
    seg = SegTrainingConfig()  # the detector's recipe (issue 22): one-cycle, hard negatives, + cross-entropy
    assert (seg.optimizer, seg.lr, seg.lr_schedule) == ("adam", 3e-3, "onecycle")
    assert (seg.background_crops, seg.background_ratio, seg.bce_weight, seg.fn_weight) == (100, 1, 1.0, 8.0)
    older = {k: v for k, v in seg.to_dict().items() if k not in ("bce_weight", "lr_schedule")}
    restored = SegTrainingConfig.from_dict(older)  # a checkpoint written before those settings: the Dice loss alone
    assert (restored.bce_weight, restored.lr_schedule) == (0.0, "constant")


def test_a_checkpoint_saved_with_sgd_resumes_as_sgd(tiny, tmp_path):
    assert training.main([*_args(tiny, tmp_path, "--optimizer", "sgd"), "--epochs", "1"]) == 0
    last = _last(tmp_path)
    # The default is now Adam; a resume without --optimizer keeps the checkpoint's SGD.
    assert training.main(["--resume", str(last), "--epochs", "2", "--log-level", "WARNING"]) == 0
    state = load_checkpoint(last)
    assert state["epoch"] == 2 and state["config"]["optimizer"] == "sgd"
    group = state["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.99 and "nesterov" in group and "betas" not in group


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--optimizer", "adam"], "--optimizer sgd → adam"),
        (["--lr-schedule", "cosine"], "--lr-schedule onecycle → cosine"),
    ],
)
def test_resume_refuses_another_optimizer_or_schedule(tiny, tmp_path, capsys, flags, named):
    assert training.main([*_args(tiny, tmp_path, "--optimizer", "sgd"), "--epochs", "1"]) == 0
    last = _last(tmp_path)
    capsys.readouterr()
    argv = ["--resume", str(last), "--epochs", "2", "--allow-config-change", "--log-level", "WARNING", *flags]
    assert training.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "--init-weights" in err
    assert load_checkpoint(last)["epoch"] == 1


# -- lr schedules ----------------------------------------------------------------------------------


def _steps(plan: LrPlan, lr: float = 1.0, steps: int | None = None) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(optimizer, plan)
    seen = []
    for _ in range(steps or plan.total_steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return seen


def test_plan_turns_samples_into_steps_with_documented_default_warmups():
    assert plan_schedule(_config(), 10, 32) == LrPlan("onecycle", 10, 3)  # the default: 30 % warm-up
    assert plan_schedule(_config("--lr-schedule", "constant"), 10, 32) == LrPlan("constant", None, 0)
    # a default warm-up shortened to fit a short run; a run too short for a cycle keeps --lr (and says so)
    assert [plan_schedule(_config(), steps, 32) for steps in (4, 3)] == [
        LrPlan("onecycle", 4, 2),
        LrPlan("onecycle", 3, 2),
    ]
    assert plan_schedule(_config(), 2, 32) == plan_schedule(_config(), 1, 32) == LrPlan("constant", None, 0)
    assert plan_schedule(_config("--epochs", "4", "--lr-schedule", "cosine"), 50, 32) == LrPlan("cosine", 200, 10)
    assert plan_schedule(_config("--epochs", "4", "--lr-schedule", "onecycle"), 50, 32) == LrPlan("onecycle", 200, 60)
    schedule = ("--lr-schedule", "cosine", "--schedule-samples", "6144", "--warmup-samples", "100")
    assert plan_schedule(_config(*schedule), 32, 32) == LrPlan("cosine", 192, 4)  # ceil(100 / 32)
    assert plan_schedule(_config("--lr-schedule", "constant", "--warmup-samples", "64"), 10, 16) == LrPlan(
        "constant", None, 4
    )
    with pytest.raises(ConfigError, match="warm-up of 20 steps does not fit in the schedule of 10 steps"):
        plan_schedule(_config("--lr-schedule", "cosine", "--warmup-samples", "640"), 10, 32)


def test_cosine_warms_up_linearly_then_decays_to_zero():
    lr = _steps(LrPlan("cosine", 20, 4), lr=0.1)
    assert lr[:5] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])  # warm-up, then the peak
    cosine = [0.05 * (1 + math.cos(math.pi * k / 16)) for k in range(16)]
    assert lr[4:] == pytest.approx(cosine)
    assert all(a >= b for a, b in itertools.pairwise(lr[3:]))


def test_onecycle_rises_to_the_peak_then_falls_near_zero():
    lr = _steps(LrPlan("onecycle", 20, 6), lr=0.1)
    assert lr[0] == pytest.approx(0.1 / 25) and lr[5] == pytest.approx(0.1) and max(lr) == pytest.approx(0.1)
    assert all(a < b for a, b in itertools.pairwise(lr[:6])) and all(a > b for a, b in itertools.pairwise(lr[5:]))
    assert lr[-1] < 1e-3 * 0.1


def test_constant_with_warmup_then_holds():
    assert _steps(LrPlan("constant", None, 4), lr=0.1, steps=7) == pytest.approx([0.025, 0.05, 0.075] + [0.1] * 4)
    assert (
        make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), LrPlan("constant", None, 0)) is None
    )


def test_horizon_refuses_a_run_longer_than_its_schedule():
    config = _config("--lr-schedule", "cosine", "--epochs", "3", "--schedule-samples", "64")
    with pytest.raises(ConfigError, match="--schedule-samples 64: the cosine lr schedule would end after 2 steps"):
        check_horizon(LrPlan("cosine", 2, 0), 0, 1, config, 0)
    check_horizon(LrPlan("cosine", 3, 0), 0, 1, config, 0)  # fits
    check_horizon(LrPlan("constant", None, 0), 10**6, 1, config, 0)  # no end


def test_a_two_epoch_schedule_equals_one_epoch_and_a_resume(tiny, tmp_path, lrs):
    """lr per step, schedule state and weights: 2 epochs straight = 1 epoch + --resume to 2 (cosine, mixup)."""
    recipe = ("--lr-schedule", "cosine", "--schedule-samples", str(2 * STEPS * BATCH), "--warmup-samples", "4")
    recipe += ("--augmented", "--mixup", "0.4", "--lr", "0.01")
    assert training.main([*_args(tiny, tmp_path / "straight", *recipe), "--epochs", "2"]) == 0
    straight = list(lrs)
    lrs.clear()
    assert training.main([*_args(tiny, tmp_path / "parts", *recipe), "--epochs", "1"]) == 0
    last = _last(tmp_path / "parts")
    assert training.main([*_args(tiny, tmp_path / "parts", *recipe), "--epochs", "2", "--resume", str(last)]) == 0
    assert lrs == straight and len(straight) == 2 * STEPS
    assert straight[0] == pytest.approx(0.01) and straight[-1] < straight[1]  # one warm-up step, then decay
    a, b = load_checkpoint(_last(tmp_path / "straight")), load_checkpoint(last)
    assert a["scheduler"] == b["scheduler"] and a["schedule"] == b["schedule"] == {
        "kind": "cosine", "total_steps": 2 * STEPS, "warmup_steps": 1,
    }  # fmt: skip
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key


def test_resume_with_a_new_lr_scales_the_rest_of_the_schedule(tiny, tmp_path, lrs):
    recipe = ("--lr-schedule", "onecycle", "--schedule-samples", str(2 * STEPS * BATCH), "--warmup-samples", "8")
    assert training.main([*_args(tiny, tmp_path / "straight", *recipe), "--epochs", "2"]) == 0
    straight = list(lrs)
    lrs.clear()
    assert training.main([*_args(tiny, tmp_path / "parts", *recipe), "--epochs", "1"]) == 0
    last = _last(tmp_path / "parts")
    half = TrainingConfig.lr / 2
    assert training.main(["--resume", str(last), "--epochs", "2", "--lr", str(half), "--log-level", "WARNING"]) == 0
    assert lrs[:STEPS] == straight[:STEPS]
    assert lrs[STEPS:] == pytest.approx([lr / 2 for lr in straight[STEPS:]])
    assert load_checkpoint(last)["config"]["lr"] == half


def test_extending_a_finished_schedule_on_resume_is_refused(tiny, tmp_path, capsys):
    assert training.main([*_args(tiny, tmp_path, "--lr-schedule", "cosine"), "--epochs", "1"]) == 0
    last = _last(tmp_path)
    capsys.readouterr()
    assert training.main(["--resume", str(last), "--epochs", "2", "--log-level", "WARNING"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cosine lr schedule ends after 2 optimizer steps" in err
    assert "pass --epochs 1 or less" in err and "--schedule-samples" in err
    assert load_checkpoint(last)["epoch"] == 1


def test_the_lr_is_logged_per_epoch(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = ("--lr-schedule", "cosine", "--warmup-samples", "0", "--lr", "0.01")
    assert training.main([*_args(tiny, tmp_path, *recipe), "--epochs", "2"]) == 0
    (trn,) = (tmp_path / "runs" / "p2ch").glob("*-trn_cls-*")
    acc = EventAccumulator(str(trn))
    acc.Reload()
    logged = [e.value for e in acc.Scalars("lr")]
    assert logged == pytest.approx([0.005, 0.0], abs=1e-9)  # after epoch 1 of 2: half-way down the cosine


# -- mixup -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.05, 0.2, 1.0, 4.0])
def test_beta_draws_follow_beta(alpha):
    from scipy import stats

    draws = sample_beta(alpha, 20000, torch.Generator().manual_seed(1)).double().numpy()
    assert ((draws >= 0) & (draws <= 1)).all()
    assert abs(draws.mean() - 0.5) < 0.01 and abs((draws < 0.5).mean() - 0.5) < 0.02  # symmetric
    assert draws.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)
    # The lower half against Beta's: float32 rounds values within 6e-8 of 1 (much of the mass for small
    # alphas) to 1, but has the resolution near 0.
    lower = draws[draws < 0.5]
    assert stats.kstest(lower, lambda t: 2 * stats.beta(alpha, alpha).cdf(t)).pvalue > 1e-3


def test_beta_draws_are_determined_by_the_generator():
    a = sample_beta(0.2, 64, torch.Generator().manual_seed(5))
    assert torch.equal(a, sample_beta(0.2, 64, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, sample_beta(0.2, 64, torch.Generator().manual_seed(6)))


def test_mix_batch_mixes_inputs_and_soft_labels_alike():
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    x = labels.float().view(-1, 1, 1, 1, 1).expand(-1, 1, 2, 3, 3).clone()  # each sample filled with its label
    mixed, targets, lam = mix_batch(x, labels, 1.0, torch.Generator().manual_seed(1))
    assert mixed.shape == x.shape and targets.shape == (8, 2) and lam.shape == (8,)
    assert ((lam >= 0.5) & (lam <= 1)).all()
    assert torch.allclose(targets.sum(dim=1), torch.ones(8))
    assert torch.allclose(mixed.flatten(1), targets[:, 1:].expand(-1, 18))  # same λ and partner for x and y
    own = targets[torch.arange(8), labels]
    assert (own >= 0.5 - 1e-6).all()  # a sample's own label keeps the larger share
    assert ((targets > 0) & (targets < 1)).any()  # soft where a sample met one of the other class


def test_label_smoothing_applies_to_mixed_targets():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    targets = torch.tensor([[0.7, 0.3], [0.0, 1.0]])
    eps = 0.1
    smoothed = targets * (1 - eps) + eps / 2
    expected = -(smoothed * F.log_softmax(logits, dim=1)).sum(dim=1)
    got = F.cross_entropy(logits, targets, reduction="none", label_smoothing=eps)
    assert torch.allclose(got, expected)


def test_mixup_mixes_training_batches_only_and_zero_is_off(tiny, tmp_path, monkeypatch):
    calls = []
    mix = training.mix_batch

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return mix(*args, **kwargs)

    monkeypatch.setattr(training, "mix_batch", counting)
    assert training.main([*_args(tiny, tmp_path / "on", "--mixup", "0.4"), "--epochs", "1"]) == 0
    assert calls == [BATCH] * STEPS  # every training batch, no validation batch
    calls.clear()
    assert training.main([*_args(tiny, tmp_path / "zero", "--mixup", "0"), "--epochs", "1"]) == 0
    assert training.main([*_args(tiny, tmp_path / "default"), "--epochs", "1"]) == 0
    assert calls == []
    zero, default = load_checkpoint(_last(tmp_path / "zero")), load_checkpoint(_last(tmp_path / "default"))
    on = load_checkpoint(_last(tmp_path / "on"))
    assert all(torch.equal(t, default["model"][k]) for k, t in zero["model"].items())
    assert not all(torch.equal(t, default["model"][k]) for k, t in on["model"].items())


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--mixup", "-0.2"], "--mixup must be ≥ 0"),
        (["--mixup", "inf"], "--mixup must be a finite number, got inf"),
        (["--mixup", "nan"], "--mixup must be a finite number, got nan"),
        (["--warmup-samples", "-1"], "--warmup-samples must be ≥ 0"),
        (["--lr-schedule", "cosine", "--schedule-samples", "0"], "--schedule-samples must be ≥ 1"),
        (["--lr-schedule", "constant", "--schedule-samples", "100"], "a constant lr has no end"),
    ],
)
def test_bad_recipe_flags_are_one_line(tmp_path, capsys, monkeypatch, flags, expected):
    monkeypatch.setattr(training, "build_data", lambda *a: pytest.fail("data read before the flags were checked"))
    assert training.main([*_args(tmp_path / "luna", tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("p2ch.training: error:") and expected in err


def test_a_schedule_shorter_than_the_run_is_refused_before_training(tiny, tmp_path, capsys):
    flags = ("--lr-schedule", "cosine", "--schedule-samples", str(STEPS * BATCH))
    assert training.main([*_args(tiny, tmp_path, *flags), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would end after 2 steps, before this run's 2 epochs of 2 steps" in err
    assert not list((tmp_path / "models").rglob("*.pt"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixup_on_a_cuda_generator_stays_on_the_device_and_is_deterministic():
    x = torch.randn(16, 1, 4, 6, 6, device="cuda")
    labels = torch.randint(0, 2, (16,), device="cuda")
    a = mix_batch(x, labels, 0.2, torch.Generator(device="cuda").manual_seed(3))
    b = mix_batch(x, labels, 0.2, torch.Generator(device="cuda").manual_seed(3))
    assert all(t.device.type == "cuda" for t in a)
    assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def test_the_segmentation_run_follows_the_schedule_too(synth_set, tmp_path, lrs):
    from p2ch import seg_training

    root = synth_set(num_cts=4, size=64, slices=24, candidates_per_ct=10, nodules_per_ct=2, seed=21)
    argv = [
        "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
        "--checkpoint-dir", str(tmp_path / "models"), "--batch-size", "4", "--num-workers", "0", "--epoch-size", "8",
        "--crop-size", "32", "--val-fraction", "0.5", "--images-every", "0", "--max-val-batches", "1",
        "--log-level", "WARNING", "--lr-schedule", "cosine", "--warmup-samples", "0", "--epochs", "1",
    ]  # fmt: skip
    assert seg_training.main(argv) == 0
    assert lrs == pytest.approx([3e-3, 1.5e-3])  # 2 steps of a cosine from --lr (0.003) down to 0
    (last,) = (tmp_path / "models").rglob("last.pt")
    state = load_checkpoint(last)
    assert state["schedule"] == {"kind": "cosine", "total_steps": 2, "warmup_steps": 0}
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
