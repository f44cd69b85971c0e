"""python -m p2ch.import_book_models: the book's model files (written here in the book's format) as p2ch models.

The book's files are never in the repository: each test builds a model with the book's layer names and order
(`BookUNetWrapper` below is the book's UNet as its chapter 13 describes it, written for this test; the classifier
is a LunaModel at width 8, the book's), saves it as the book's training apps do (`torch.save` of a dict with
model_state, model_name, optimizer_state, …), imports it and compares what p2ch's loaders rebuild.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import nn

from p2ch import evaluate, import_book_models, nodule_analysis, seg_training
from p2ch.bookmodels import BOOK_SEGMENTATION_THRESHOLD, model_file_name, recognise
from p2ch.checkpoint import load_checkpoint, load_finetune_weights, load_model, load_segmentation_model, sha1_of
from p2ch.config import display_path
from p2ch.ct import Ct
from p2ch.errors import DataFormatError
from p2ch.metrics import match_predictions
from p2ch.model import LunaModel
from p2ch.unet import UNetWrapper, unet_signature

from conftest import make_model

# the data set of tests/test_nodule_analysis.py (generated once per session and shared)
ANALYSIS_SET = {"num_cts": 3, "size": 96, "slices": 48, "candidates_per_ct": 20, "nodules_per_ct": 3, "seed": 12}
SEG_NAME = "seg_2020-01-26_19.45.12_w4d3c1-bal_1_nodupe-label_pos-d1_fn8-adam.best.state"
CLS_NAME = "cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state"


# ---------------------------------------------------------------------------------------------
# the book's models, in its layout


class BookConvBlock(nn.Module):
    """The book's block: (Conv2d 3×3 with bias, ReLU, BatchNorm2d) twice."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout),
            nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout),
        )  # fmt: skip

    def forward(self, x):
        return self.block(x)


class BookUpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, up_mode: str):
        super().__init__()
        if up_mode == "upconv":
            self.up = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(cin, cout, 1))
        self.conv_block = BookConvBlock(cin, cout)

    def forward(self, x, skip):
        return self.conv_block(torch.cat([self.up(x), skip], dim=1))


class BookUNet(nn.Module):
    """Padded UNet, average pooling between levels, as the book's util/unet.py."""

    def __init__(self, cin: int, depth: int, wf: int, up_mode: str):
        super().__init__()
        widths = [2 ** (wf + i) for i in range(depth)]
        self.down_path = nn.ModuleList(BookConvBlock(c, w) for c, w in zip([cin, *widths[:-1]], widths, strict=True))
        self.up_path = nn.ModuleList(BookUpBlock(widths[i + 1], widths[i], up_mode) for i in reversed(range(depth - 1)))
        self.last = nn.Conv2d(widths[0], 1, kernel_size=1)

    def forward(self, x):
        skips = []
        for level, down in enumerate(self.down_path):
            x = down(x)
            if level < len(self.down_path) - 1:
                skips.append(x)
                x = F.avg_pool2d(x, 2)
        for up in self.up_path:
            x = up(x, skips.pop())
        return self.last(x)


class BookUNetWrapper(nn.Module):
    def __init__(self, in_channels: int = 7, depth: int = 3, wf: int = 4, up_mode: str = "upconv"):
        super().__init__()
        self.input_batchnorm = nn.BatchNorm2d(in_channels)
        self.unet = BookUNet(in_channels, depth, wf, up_mode)
        self.final = nn.Sigmoid()

    def forward(self, x):
        return self.final(self.unet(self.input_batchnorm(x)))


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking batch norms (statistics and affine parameters not at their defaults); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
                module.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                module.bias.copy_(0.1 * torch.randn(n, generator=g))
        if isinstance(model, BookUNetWrapper):  # raw HU in: the input norm's statistics are those of CT
            model.input_batchnorm.running_mean.fill_(-500.0)
            model.input_batchnorm.running_var.fill_(400.0**2)
    return model.eval()


def spread_logits(model: BookUNetWrapper, x: torch.Tensor) -> BookUNetWrapper:
    """Scale and shift the last 1×1 convolution so the logits on `x` have mean 0 and std 2: probabilities spread
    over (0, 1) (fresh weights give nearly constant ones, which would make a comparison toothless)."""
    with torch.no_grad():
        logits = model.unet(model.input_batchnorm(x))
        scale = 2.0 / float(logits.std())
        model.unet.last.weight.mul_(scale)
        model.unet.last.bias.sub_(float(logits.mean())).mul_(scale)
    return model


def hu_threshold_unet(context: int, hu: float, gain: float = 50.0) -> BookUNetWrapper:
    """A book-layout UNet (depth 2, wf 2) that computes P = sigmoid(gain · (HU of the centre slice - hu) / 1000):
    identity paths through the top level and the skip, zero elsewhere, and the threshold in the last bias."""
    model = BookUNetWrapper(in_channels=2 * context + 1, depth=2, wf=2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.weight.fill_(1.0)
        model.input_batchnorm.running_var.fill_(1000.0**2)  # HU / 1000
        top = model.unet.down_path[0].block
        top[0].weight[0, context, 1, 1] = 1.0
        top[0].bias[0] = 2.0  # HU / 1000 + 2 > 0 passes the ReLUs
        top[3].weight[0, 0, 1, 1] = 1.0
        up = model.unet.up_path[-1].conv_block.block
        up[0].weight[0, 4, 1, 1] = 1.0  # channel 0 of the skip, after the 4 up-sampled channels
        up[3].weight[0, 0, 1, 1] = 1.0
        model.unet.last.weight[0, 0] = gain
        model.unet.last.bias[0] = -gain * (2.0 + hu / 1000.0)
    return model.eval()


def save_book_file(
    path: Path, model: nn.Module, model_name: str | None, *, optimizer: str = "Adam", legacy: bool = False, **extra
) -> Path:
    """`model` saved as the book's training apps save it (p2ch13/p2ch14 training.py saveModel)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3) if optimizer == "Adam" else None
    if optimizer == "SGD":
        opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.99, weight_decay=1e-4)
    state = {
        "sys_argv": ["p2ch14/training.py", "--epochs=100", "nodule-nonnodule"],
        "time": "2020-02-06 14:16:55.123456",
        "model_state": model.state_dict(),
        "model_name": model_name,
        "optimizer_state": opt.state_dict(),
        "optimizer_name": type(opt).__name__,
        "epoch": 40,
        "totalTrainingSamples_count": 2_000_000,
        **extra,
    }
    if model_name is None:
        del state["model_name"]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = import_book_models.main([*argv, "--log-level", "WARNING"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def hu_chunks(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 32, 48, 48) float HU chunks, as the classifier takes them."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n, 1, 32, 48, 48), generator=g) * 400 - 400).clamp(-1000, 1000)


def hu_slices(n: int, channels: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n, channels, size, size), generator=g) * 400 - 400).clamp(-1000, 1000)


def test_help_says_what_it_takes_and_where_it_writes(capsys):
    with pytest.raises(SystemExit) as exc:
        import_book_models.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("PATH", "--out", "--models-dir", "--task", "--force", "data/part2/models", "<--models-dir>/book"):
        assert word in out, word


# ---------------------------------------------------------------------------------------------
# the UNet: the book's block order, equivalence


@pytest.mark.parametrize(
    ("context", "depth", "wf", "up_mode", "legacy"),
    [(3, 3, 4, "upconv", True), (1, 2, 2, "upsample", False)],
    ids=["the-books-seg-model", "small-upsample"],
)
def test_book_unet_imports_and_gives_the_same_probabilities(tmp_path, capsys, context, depth, wf, up_mode, legacy):
    x = hu_slices(3, 2 * context + 1)
    book = spread_logits(randomise(BookUNetWrapper(2 * context + 1, depth, wf, up_mode), seed=depth), x)
    if (context, depth, wf) == (3, 3, 4):
        assert len(book.state_dict()) == 81  # the book's segmentation file holds 81 tensors
    source = save_book_file(tmp_path / SEG_NAME, book, "UNetWrapper", legacy=legacy, sys_argv=["x", "--augmented"])
    rc, out, _ = run(capsys, str(source), "--out", str(tmp_path / "models"))
    assert rc == 0 and "segmentation model" in out
    target = tmp_path / "models" / model_file_name(SEG_NAME) / "best.pt"
    model, settings = load_segmentation_model(target)
    assert settings["context_slices"] == context and settings["threshold"] == BOOK_SEGMENTATION_THRESHOLD
    config = settings["config"]
    assert (config.depth, config.wf, config.up_mode, config.block_order) == (depth, wf, up_mode, "book")
    assert config.augmented and config.optimizer == "adam" and config.split == "series-stride"
    assert model.settings["block_order"] == "book" and settings["info"]["arch"].startswith("UNetWrapper-v1-book:")
    assert settings["info"]["imported_from"]["sha1"] == sha1_of(source)
    assert settings["info"]["imported_from"]["file"] == SEG_NAME and settings["info"]["epoch"] == 40
    with torch.no_grad():
        prob = book(x)
        assert float(prob.std()) > 0.05 and 0.01 < float(prob.mean()) < 0.99  # spread, not saturated: the test bites
        torch.testing.assert_close(model(x), prob, rtol=1e-5, atol=1e-6)
    assert unet_signature(UNetWrapper(2 * context + 1, 1, depth, wf, up_mode=up_mode)) != settings["info"]["arch"]


# ---------------------------------------------------------------------------------------------
# the classifier


def test_book_classifier_is_a_plain_load_at_width_8(tmp_path, capsys):
    book = make_model(seed=3)
    assert book.conv_channels == 8
    wrapped = {f"module.{k}": v for k, v in book.state_dict().items()}  # saved from DataParallel
    source = tmp_path / CLS_NAME
    save_book_file(source, book, "LunaModel", optimizer="SGD")
    state = torch.load(source, weights_only=True)
    state["model_state"] = wrapped
    torch.save(state, source)
    rc, out, _ = run(capsys, str(source), "--out", str(tmp_path / "cls.pt"))
    assert rc == 0 and "nodule classifier (LunaModel, width 8), epoch 40, 2,000,000 training samples" in out
    model, info = load_model(tmp_path / "cls.pt", task="nodule")
    saved = load_checkpoint(tmp_path / "cls.pt")
    assert all(torch.equal(saved["model"][k], v) for k, v in book.state_dict().items())
    assert info.config.model_width == 8 and info.config.width_irc == (32, 48, 48)
    optimizer = (info.config.optimizer, info.config.lr, info.config.momentum, info.config.weight_decay)
    assert optimizer == ("sgd", 0.001, 0.99, 1e-4)  # read from the file's optimizer_state
    assert (info.config.split, info.config.val_stride) == ("series-stride", 10)
    assert info.epoch == 40 and info.samples_seen == 2_000_000 and info.run_time == "2020-02-06_14.16.55"
    assert info.to_dict()["imported_from"]["sha1"] == sha1_of(source) and "optimizer" not in saved
    # the malignancy model is fine-tuned from it (--finetune), as chapter 14 does from this very file
    assert load_finetune_weights(LunaModel(conv_channels=8), tmp_path / "cls.pt", (32, 48, 48))["task"] == "nodule"
    x = hu_chunks(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), book(x), rtol=0, atol=0)


class Chapter11LunaModel(nn.Module):
    """The book's first LunaModel names: input_batchnorm, convAndPool_seq (conv, ReLU, conv, ReLU, pool)×4,
    fullyConnected_layer."""

    def __init__(self, head_inputs: int = 1152):
        super().__init__()
        self.input_batchnorm = nn.BatchNorm3d(1)
        layers, cin = [], 1
        for cout in (8, 16, 32, 64):
            layers += [nn.Conv3d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv3d(cout, cout, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool3d(2, 2))
            cin = cout
        self.convAndPool_seq = nn.Sequential(*layers)
        self.fullyConnected_layer = nn.Linear(head_inputs, 2)

    def forward(self, x):
        logits = self.fullyConnected_layer(self.convAndPool_seq(self.input_batchnorm(x)).flatten(1))
        return logits, torch.softmax(logits, dim=1)


def test_chapter11_names_are_mapped_when_the_shapes_fit(tmp_path):
    old = randomise(Chapter11LunaModel(), seed=5)
    with torch.no_grad():
        old.input_batchnorm.running_mean.fill_(-500.0)
        old.input_batchnorm.running_var.fill_(400.0**2)
    book = recognise(save_book_file(tmp_path / "cls_old.state", old, "LunaModel"))
    assert isinstance(book.model, LunaModel) and "chapter 11" in book.layout
    x = hu_chunks(2)
    with torch.no_grad():
        torch.testing.assert_close(book.model(x), old(x), rtol=1e-5, atol=1e-6)
    small = save_book_file(tmp_path / "cls_small.state", Chapter11LunaModel(head_inputs=576), "LunaModel")
    with pytest.raises(
        DataFormatError, match=r"fullyConnected_layer\.weight has shape \(2, 576\), expected \(2, 1152\)"
    ):
        recognise(small)


def test_task_comes_from_the_recorded_command_line_or_the_flag(tmp_path, capsys):
    argv = ["p2ch14/training.py", "--malignant", "--dataset=MalignantLunaDataset", "--finetune=x", "finetune-head"]
    source = save_book_file(tmp_path / "in" / "cls_mal.state", make_model(), "LunaModel", sys_argv=argv)
    assert recognise(source).task == "malignancy"
    rc, _, _ = run(capsys, str(source), "--out", str(tmp_path / "a"), "--task", "nodule")
    assert rc == 0 and load_checkpoint(tmp_path / "a" / "cls_mal" / "best.pt")["task"] == "nodule"


# ---------------------------------------------------------------------------------------------
# bad input: one line each


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_file(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.state"
    unet = BookUNetWrapper(3, 2, 2)
    if kind == "text":
        path.write_text("seriesuid,coordX\n")
    elif kind == "lfs-pointer":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 1048576\n")
    elif kind == "code":
        torch.save({"model_state": make_model().state_dict(), "x": _RunsCode(folder / "ran")}, path)
    elif kind == "no-model-state":
        torch.save({"state_dict": make_model().state_dict(), "epoch": 1}, path)
    elif kind == "unknown-name":
        save_book_file(path, make_model(), "ModifiedLunaModel")
    elif kind == "missing-tensor":
        save_book_file(path, unet, "UNetWrapper")
        state = torch.load(path, weights_only=True)
        del state["model_state"]["unet.up_path.0.conv_block.block.3.weight"]
        torch.save(state, path)
    elif kind == "wrong-shape":
        model = make_model()
        model.head_linear = nn.Linear(1152, 3)
        save_book_file(path, model, "LunaModel")
    elif kind == "nan":
        model = make_model()
        with torch.no_grad():
            model.block2.conv1.weight[0, 0, 0, 0, 0] = float("nan")
        save_book_file(path, model, "LunaModel")
    return path


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("text", "not a file written by torch.save"),
        ("lfs-pointer", "a Git LFS pointer (a small text file), not the model itself"),
        ("code", "loading it would run code (it refers to posix.system), so it is refused and was not unpickled"),
        ("no-model-state", "has no model_state entry (keys: epoch, state_dict)"),
        ("unknown-name", "model_name 'ModifiedLunaModel' is not a model p2ch can rebuild"),
        ("missing-tensor", "no tensor unet.up_path.0.conv_block.block.3.weight (4, 4, 3, 3)"),
        ("wrong-shape", "tensor head_linear.weight has shape (3, 1152), expected (2, 1152) for LunaModel at width 8"),
        ("nan", "tensor block2.conv1.weight holds nan"),
    ],
)
def test_bad_book_files_are_one_line(tmp_path, capsys, kind, expected):
    path = _bad_file(kind, tmp_path)
    rc, out, err = run(capsys, str(path), "--out", str(tmp_path / "out"))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err and expected in err, err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_unless_forced(tmp_path, capsys):
    source = save_book_file(tmp_path / CLS_NAME, make_model(seed=1), "LunaModel")
    target = tmp_path / "models" / "book" / model_file_name(CLS_NAME) / "best.pt"
    assert run(capsys, str(source), "--models-dir", str(tmp_path / "models"))[0] == 0
    before = target.read_bytes()
    save_book_file(source, make_model(seed=2), "LunaModel")
    rc, _, err = run(capsys, str(source), "--models-dir", str(tmp_path / "models"))
    assert rc == 2 and f"--out {target} exists; pass --force" in err and err.count("\n") == 1
    assert target.read_bytes() == before
    assert run(capsys, str(source), "--models-dir", str(tmp_path / "models"), "--force")[0] == 0
    assert load_checkpoint(target)["imported_from"]["sha1"] == sha1_of(source)
    rc, _, err = run(capsys, str(source), str(source), "--out", str(tmp_path / "one.pt"))
    assert rc == 2 and "--out" in err and "names one file, but 2 model files were given" in err


def test_a_folder_imports_its_models_and_skips_the_rest(tmp_path, capsys):
    folder = tmp_path / "data" / "part2" / "models"
    save_book_file(folder / CLS_NAME, make_model(), None)  # no model_name: told by its tensors
    save_book_file(folder / SEG_NAME, BookUNetWrapper(3, 2, 2), "UNetWrapper")
    save_book_file(folder / "alternate_cls_2019-06-16_14.18.58_ch12-other-model.best.state", make_model(), "Other")
    (folder / "README.txt").write_text("not a model")
    rc, out, _ = run(capsys, str(folder), "--out", str(tmp_path / "book"))
    skipped = [line for line in out.splitlines() if line.startswith("skipped")]
    assert rc == 0 and len(skipped) == 1 and "alternate_cls" in skipped[0] and "model_name 'Other'" in skipped[0]
    assert sorted(p.parent.name for p in (tmp_path / "book").rglob("best.pt")) == sorted(
        [model_file_name(CLS_NAME), model_file_name(SEG_NAME)]
    )
    assert f"--models-dir {display_path(tmp_path / 'book')}" in out
    empty = tmp_path / "only-others"
    save_book_file(empty / "x.state", make_model(), "Other")
    rc, _, err = run(capsys, str(empty), "--out", str(tmp_path / "none"))
    assert rc == 2 and "none of the 1 files is a model p2ch can rebuild" in err


def test_a_book_file_given_to_a_p2ch_command_says_to_import_it(tmp_path, capsys):
    source = save_book_file(tmp_path / CLS_NAME, make_model(), "LunaModel")
    rc = evaluate.main(["--checkpoint", str(source), "--log-level", "WARNING", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "a model file of the book's code" in err and "python -m p2ch.import_book_models" in err


# ---------------------------------------------------------------------------------------------
# the pipeline on imported models


@pytest.fixture(scope="module")
def analysis_root(synth_set) -> Path:
    return synth_set(masks=True, **ANALYSIS_SET)


@pytest.fixture(scope="module")
def book_models(tmp_path_factory):
    """The three kinds imported from book-format files: an HU-threshold UNet, a nodule and a malignancy classifier."""
    base = tmp_path_factory.mktemp("book")
    seg, nodule, malignant = hu_threshold_unet(context=1, hu=-100.0), make_model(seed=0), make_model(seed=1)
    save_book_file(base / "files" / SEG_NAME, seg, "UNetWrapper")
    save_book_file(base / "files" / CLS_NAME, nodule, "LunaModel", optimizer="SGD")
    argv = ["p2ch14/training.py", "--malignant", "--dataset=MalignantLunaDataset"]
    save_book_file(base / "files" / "cls_2020-02-07_mal.best.state", malignant, "LunaModel", sys_argv=argv)
    assert (
        import_book_models.main([str(base / "files"), "--models-dir", str(base / "models"), "--log-level", "ERROR"])
        == 0
    )
    return {"dir": base / "models", "seg": seg, "nodule": nodule, "malignant": malignant}


def _components_by_hand(seg: nn.Module, ct: Ct) -> np.ndarray:
    """Voxel counts of the 26-connected components of P > 0.5, the book-layout UNet run here on every slice
    with its neighbours (edge slices repeated): what nodule_analysis must find before its size rule."""
    hu = torch.from_numpy(ct.hu.astype(np.float32))
    index = torch.arange(len(hu))[:, None] + torch.arange(-1, 2)[None, :]
    with torch.no_grad():
        prob = seg(hu[index.clamp(0, len(hu) - 1)])[:, 0].numpy()
    labels, _ = scipy.ndimage.label(prob > 0.5, structure=np.ones((3, 3, 3)))
    return np.sort(np.bincount(labels.ravel())[1:])


def test_nodule_analysis_runs_on_imported_models(analysis_root, book_models, tmp_path):
    from test_dicom import write_dicom_series

    annotations = pd.read_csv(analysis_root / "annotations.csv", dtype={"seriesuid": str})
    uid = str(annotations["seriesuid"].value_counts().idxmax())  # the CT with the most nodules
    ct = Ct(uid, analysis_root)
    scans = tmp_path / "scans"
    scans.mkdir()
    for suffix in (".mhd", ".raw"):
        shutil.copy(ct.mhd_path.with_suffix(suffix), scans / f"{uid}{suffix}")
    write_dicom_series(
        tmp_path / "dicom", ct.hu, spacing_xyz=ct.voxel_size_xyz, origin_xyz=ct.origin_xyz, direction=ct.direction,
        series_uid=uid,
    )  # fmt: skip
    tables = {}
    for name, spec in (("uid", uid), ("mhd", str(scans / f"{uid}.mhd")), ("dicom", str(tmp_path / "dicom"))):
        out = tmp_path / name
        argv = [spec, "--models-dir", str(book_models["dir"]), "--data-root", str(analysis_root), "--out", str(out)]
        argv += ["--nodule-threshold", "0", "--no-progress", "--no-pictures", "--log-level", "WARNING"]
        # one candidate per component, anywhere, all of them, one look: what the direct computation below does
        argv += ["--no-split", "--no-lung-mask", "--max-candidates", "0", "--no-tta"]
        assert nodule_analysis.main(argv) == 0
        tables[name] = pd.read_csv(out / uid / "components.csv", dtype={"seriesuid": str})
        summary = json.loads((out / uid / "analysis.json").read_text())
        used = summary["models"]
        assert used["segmentation"]["imported_from"]["file"] == SEG_NAME
        assert used["classification"]["imported_from"]["file"] == CLS_NAME
        assert used["malignancy"]["imported_from"]["file"] == "cls_2020-02-07_mal.best.state"
    pd.testing.assert_frame_equal(tables["uid"], tables["mhd"])
    dicom_only = ["instance_number", "sop_instance_uid", "dicom_file"]  # empty for the other inputs
    pd.testing.assert_frame_equal(
        tables["uid"].drop(columns=dicom_only), tables["dicom"].drop(columns=dicom_only), check_exact=False, atol=1e-6
    )
    components = tables["uid"]
    np.testing.assert_array_equal(np.sort(components["voxels"].to_numpy()), _components_by_hand(book_models["seg"], ct))
    kept = components[components["kept"]]
    assert len(kept) >= 2
    chunks, _ = ct.get_raw_candidates(kept[["coordX", "coordY", "coordZ"]].to_numpy())
    with torch.no_grad():
        x = torch.from_numpy(chunks).float()[:, None]
        for column, model in (("p_nodule", book_models["nodule"]), ("p_malignant", book_models["malignant"])):
            np.testing.assert_allclose(kept[column].to_numpy(), model(x)[1][:, 1].numpy(), rtol=1e-4, atol=1e-6)
    scored = kept[["seriesuid", "coordX", "coordY", "coordZ"]].assign(probability=kept["p_nodule"])
    truth = annotations[annotations["seriesuid"] == uid].reset_index(drop=True)
    assert match_predictions(scored, truth).is_detected.any(), "the HU-threshold UNet finds a solid nodule"


def test_evaluate_scores_an_imported_classifier_on_the_books_validation_series(analysis_root, tmp_path, capsys):
    from p2ch.candidates import read_annotations, read_excluded
    from p2ch.metrics import froc

    source = save_book_file(tmp_path / CLS_NAME, make_model(), "LunaModel", optimizer="SGD")
    assert run(capsys, str(source), "--out", str(tmp_path / "cls.pt"))[0] == 0
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(tmp_path / "cls.pt"), "--data-root", str(analysis_root), "--no-cache"]
    assert evaluate.main([*argv, "--bootstrap", "0", "--out", str(out), "--log-level", "WARNING", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    submission = pd.read_csv(out / "submission.csv", dtype={"seriesuid": str})
    val = sorted(p.stem for p in analysis_root.glob("subset*/*.mhd"))[::10]  # the book's validation series
    assert sorted(submission["seriesuid"].unique()) == val
    annotations = read_annotations(analysis_root / "annotations.csv")
    annotations = annotations[annotations["seriesuid"].isin(val)]
    excluded = read_excluded(analysis_root / "annotations_excluded.csv")
    expected = froc(submission, annotations, excluded[excluded["seriesuid"].isin(val)], series_uids=val, bootstrap=0)
    assert metrics["froc"]["num_nodules"] == len(annotations) >= 1
    assert metrics["froc"]["cpm"] == pytest.approx(expected.cpm, abs=1e-12)


def test_seg_training_continues_the_books_unet(synth_set, tmp_path, capsys):
    root = synth_set(num_cts=4, size=64, slices=24, candidates_per_ct=10, nodules_per_ct=2, seed=21)
    source = save_book_file(tmp_path / SEG_NAME, randomise(BookUNetWrapper(3, 2, 2)), "UNetWrapper")
    assert run(capsys, str(source), "--out", str(tmp_path / "seg.pt"))[0] == 0
    argv = [
        "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
        "--checkpoint-dir", str(tmp_path / "models"), "--batch-size", "4", "--num-workers", "0", "--epoch-size", "4",
        "--crop-size", "32", "--val-fraction", "0.5", "--max-val-batches", "1", "--images-every", "0",
        "--context-slices", "1", "--depth", "2", "--wf", "2", "--log-level", "WARNING",
        "--init-weights", str(tmp_path / "seg.pt"),
    ]  # fmt: skip
    assert seg_training.main(argv) == 0
    (last,) = (tmp_path / "models").rglob("last.pt")
    state = load_checkpoint(last)
    assert state["config"]["block_order"] == "book" and state["arch"] == load_checkpoint(tmp_path / "seg.pt")["arch"]
    # the book's weights were loaded: its input norm's running mean (-500 HU) moved one step, not from 0
    assert float(state["model"]["input_batchnorm.running_mean"].mean()) < -300
    assert seg_training.main(["--resume", str(last), "--epochs", "2", "--log-level", "WARNING"]) == 0
    resumed = load_checkpoint(last)
    assert resumed["epoch"] == 2 and resumed["arch"] == state["arch"] and resumed["config"]["block_order"] == "book"
