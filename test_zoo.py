"""Tests of zoo.py's external zoo (zoo.json + torch.export / TorchScript programs) and of its cache repair.

CPU, deterministic, a few seconds: the built-in teachers are tiny (synthetic data at 16x16, one epoch); the
external ones are small TorchScript modules of architectures models.py does not have, written here. Expected
class ids, drawn columns and teacher inputs are derived by hand or by a naive reference in each test.
"""
import json
import zipfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import external
import zoo
from data import UserError
from models import Conv4

# torch 2.13 deprecates torch.jit; TorchScript teachers are still one of the two formats an external zoo takes
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
TINY = zoo.ZooSettings(epochs=1, batch_size=64)  # one epoch: enough for BatchNorm running stats to move
WAY = 5


# ---------------------------------------------------------------------------------- helpers
class Mlp(nn.Module):
    """A classifier models.py does not have: flatten -> Linear -> ReLU -> Linear. `mode` makes it misbehave
    ("nan": non-finite logits, "detach": logits cut from the input's graph)."""

    def __init__(self, channels, size, classes, mode="ok", hidden=8):
        super().__init__()
        self.fc1 = nn.Linear(channels * size * size, hidden)
        self.fc2 = nn.Linear(hidden, classes)
        self.mode = mode

    def forward(self, x):
        y = self.fc2(torch.relu(self.fc1(x.flatten(1))))
        if self.mode == "nan":
            return y * float("nan")
        if self.mode == "detach":
            return y.detach()
        return y


class Pixels(nn.Module):
    """A 'teacher' whose logits are its input pixels, [n, C*S*S]: it shows exactly the images it gets."""

    def forward(self, x):
        return x.flatten(1)


def save_script(module, path):
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(module), str(path))


def fake_dataset(channels, size, n_train=10, n_val=5, n_test=5):
    """What load_zoo_dir reads of a data set: c00.. meta-train, then meta-validation, then meta-test names."""
    names = [f"c{i:02d}" for i in range(n_train + n_val + n_test)]
    split = lambda lo, hi: SimpleNamespace(classes=list(range(lo, hi)))  # noqa: E731
    return SimpleNamespace(name="fake", channels=channels, image_size=size, class_names=names,
                           splits={"train": split(0, n_train), "val": split(n_train, n_train + n_val),
                                   "test": split(n_train + n_val, n_train + n_val + n_test)})


def entry(file, classes, size, channels, mean=None, std=None):
    return {"file": file, "classes": classes,
            "input": {"size": size, "channels": channels, "mean": mean or [0.5] * channels,
                      "std": std or [0.25] * channels}}


def write_zoo(folder, entries):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / external.ZOO_JSON).write_text(json.dumps({"teachers": entries}))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return data.load_dataset("synthetic", str(tmp_path_factory.mktemp("data")), image_size=16)


@pytest.fixture(scope="module")
def built_in(synthetic, tmp_path_factory):
    """A tiny built-in "mix" zoo: teacher 0 is a conv4, teacher 1 a resnet10 (zoo.teacher_arch)."""
    return zoo.build_zoo(synthetic, "mix", 2, WAY, 0, "tiny", TINY, tmp_path_factory.mktemp("cache"), "cpu")


# ---------------------------------------------------------------------------------- export round trip
def test_exported_zoo_loads_back_to_the_same_logits_gradients_and_class_ids(built_in, synthetic, tmp_path):
    assert [t.arch for t in built_in] == ["conv4", "resnet10"]
    external.export_zoo(built_in, synthetic, tmp_path)
    spec = json.loads((tmp_path / external.ZOO_JSON).read_text())["teachers"]
    loaded = external.load_zoo_dir(tmp_path, synthetic, WAY, "cpu")
    torch.manual_seed(1)
    for t, e, back in zip(built_in, spec, loaded):
        assert external.program_format(tmp_path / e["file"]) == "export"
        assert e["classes"] == [synthetic.class_names[c] for c in t.classes]
        assert e["input"]["size"] == 16 and e["input"]["channels"] == 3
        torch.testing.assert_close(torch.tensor(e["input"]["mean"]), torch.tensor(synthetic.mean), rtol=0, atol=1e-7)
        torch.testing.assert_close(torch.tensor(e["input"]["std"]), torch.tensor(synthetic.std), rtol=0, atol=1e-7)
        program = back.model.program
        assert not any(n.startswith("normalize.") for n in program.state_dict())  # exported without Normalize
        assert back.classes == t.classes and back.class_names == e["classes"]
        assert (back.arch, back.acc) == (external.EXTERNAL_ARCH, None)
        for batch in (1, 7):  # the batch dimension is dynamic
            x = torch.rand(batch, 3, 16, 16, requires_grad=True)
            (g_ref,) = torch.autograd.grad(t.model(x).square().sum(), x)
            out = back.model(x)
            (g,) = torch.autograd.grad(out.square().sum(), x)
            torch.testing.assert_close(out, t.model(x))
            torch.testing.assert_close(g, g_ref)  # dL/dx flows through the wrapped program (Eq. (1))
        assert not any(p.requires_grad for p in back.model.parameters())


def test_external_teacher_stays_in_eval_mode(built_in, synthetic, tmp_path):
    external.export_zoo(built_in[:1], synthetic, tmp_path)
    (back,) = external.load_zoo_dir(tmp_path, synthetic, WAY, "cpu")
    x = torch.rand(4, 3, 16, 16)
    before = back.model(x)
    back.model.train()  # an exported program cannot switch modes; BatchNorm must keep its running stats
    assert not back.model.training
    torch.testing.assert_close(back.model(x), before, rtol=0, atol=0)


def test_average_reads_an_exported_conv4_by_the_meta_learners_names_and_refuses_a_resnet(built_in, synthetic,
                                                                                        tmp_path):
    external.export_zoo(built_in, synthetic, tmp_path)
    conv4, resnet = external.load_zoo_dir(tmp_path, synthetic, WAY, "cpu")
    learner = Conv4(WAY, 3, 16, synthetic.mean, synthetic.std, track_running_stats=False)
    got = external.parameters_like(conv4, learner)
    expected = {n: p for n, p in built_in[0].model.named_parameters() if not n.startswith("head.")}
    assert got.keys() == expected.keys() == {n for n, _ in learner.named_parameters() if not n.startswith("head.")}
    for n in expected:
        assert torch.equal(got[n], expected[n])
    assert external.parameters_like(built_in[0], learner).keys() == expected.keys()  # a built-in conv4 alike
    with pytest.raises(UserError, match=r"average needs Conv4 teachers whose parameters are named like "
                                        r"models\.Conv4's.*teacher 1 \(teacher_001\.pt2\)"):
        external.parameters_like(resnet, learner)


# ---------------------------------------------------------------------------------- class ids and restrict
def test_names_map_to_the_data_sets_ids_and_new_names_to_ids_after_them_in_sorted_order(tmp_path):
    """Data set names c00..c19 (ids 0..19; c10.. are meta-val/test). New names, sorted: apple bee fig kiwi
    mango zebra -> 20..25. A name two teachers share is one id."""
    ds = fake_dataset(3, 8)
    names0 = ["c03", "zebra", "c07", "apple", "c01", "mango", "c09", "kiwi", "c00", "bee"]
    names1 = ["apple", "c03", "fig", "c05", "bee"]
    save_script(Mlp(3, 8, 10), tmp_path / "ten.pt")
    save_script(Mlp(3, 8, 5), tmp_path / "five.pt")
    write_zoo(tmp_path, [entry("ten.pt", names0, 8, 3), entry("five.pt", names1, 8, 3)])
    t0, t1 = external.load_zoo_dir(tmp_path, ds, WAY, "cpu")
    assert t0.classes == [3, 25, 7, 20, 1, 24, 9, 23, 0, 21]
    assert t1.classes == [20, 3, 22, 5, 21]
    assert (t0.class_names, t1.class_names) == (names0, names1)
    assert external.program_format(tmp_path / "ten.pt") == "torchscript"


def test_restrict_draws_way_columns_by_randperm_and_a_way_class_teacher_draws_nothing(tmp_path):
    ds = fake_dataset(3, 8)
    save_script(Mlp(3, 8, 10), tmp_path / "ten.pt")
    save_script(Mlp(3, 8, 5), tmp_path / "five.pt")
    write_zoo(tmp_path, [entry("ten.pt", [f"n{i}" for i in range(10)], 8, 3),
                         entry("five.pt", ["c00", "c01", "c02", "c03", "c04"], 8, 3)])
    ten, five = external.load_zoo_dir(tmp_path, ds, WAY, "cpu")
    x = torch.rand(6, 3, 8, 8, requires_grad=True)
    draws = set()
    for seed in range(8):
        view, classes = external.restrict(ten, WAY, torch.Generator().manual_seed(seed))
        columns = [ten.classes.index(c) for c in classes]
        # the documented draw: torch.randperm(10, generator) with the caller's seed, first `way`, sorted
        assert columns == sorted(torch.randperm(10, generator=torch.Generator().manual_seed(seed))[:WAY].tolist())
        out = view(x)
        assert out.shape == (6, WAY)
        torch.testing.assert_close(out, ten.model(x)[:, columns], rtol=0, atol=0)
        assert torch.autograd.grad(out.sum(), x)[0].abs().sum() > 0
        again = external.restrict(ten, WAY, torch.Generator().manual_seed(seed))[1]
        assert again == classes  # same seed, same classes (every worker agrees)
        draws.add(tuple(classes))
    assert len(draws) > 1
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    view, classes = external.restrict(five, WAY, g)
    assert view is five.model and classes == five.classes
    assert torch.equal(g.get_state(), state)  # nothing drawn
    with pytest.raises(UserError, match=r"teacher 1 \(five\.pt\) holds 5 classes; a 6-way run"):
        external.restrict(five, 6, g)


# ---------------------------------------------------------------------------------- input format
@pytest.mark.parametrize("run, teacher", [((1, 28), (3, 32)), ((3, 32), (1, 28))],
                         ids=["grey28-run-colour32-teacher", "colour32-run-grey28-teacher"])
def test_teacher_gets_its_own_size_channels_and_normalisation(tmp_path, run, teacher):
    """Naive reference: grey repeated to 3 channels (colour averaged to 1), resized bilinearly with
    half-pixel centres, then (x - mean) / std with the entry's per-channel numbers."""
    (c_run, s_run), (c_t, s_t) = run, teacher
    mean, std = [0.2, 0.5, 0.7][:c_t], [0.1, 0.25, 0.5][:c_t]
    save_script(Pixels(), tmp_path / "pixels.pt")
    write_zoo(tmp_path, [entry("pixels.pt", [f"pixel{i}" for i in range(c_t * s_t * s_t)], s_t, c_t, mean, std)])
    (t,) = external.load_zoo_dir(tmp_path, fake_dataset(c_run, s_run), WAY, "cpu")
    x = torch.rand(3, c_run, s_run, s_run)
    ref = x.repeat(1, 3, 1, 1) if c_run == 1 else x.mean(dim=1, keepdim=True)
    ref = F.interpolate(ref, size=(s_t, s_t), mode="bilinear", align_corners=False)
    ref = (ref - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    torch.testing.assert_close(t.model(x), ref.flatten(1))


def test_program_format_is_told_by_the_archive_not_the_file_name(built_in, synthetic, tmp_path):
    """An export archive named .pt and a TorchScript module named .pt2 both load, as what they are."""
    external.export_zoo(built_in[:1], synthetic, tmp_path)
    (tmp_path / "teacher_000.pt2").rename(tmp_path / "exported.pt")
    save_script(Mlp(3, 16, 5), tmp_path / "scripted.pt2")
    names = json.loads((tmp_path / external.ZOO_JSON).read_text())["teachers"][0]["classes"]
    spec = json.loads((tmp_path / external.ZOO_JSON).read_text())["teachers"][0]["input"]
    write_zoo(tmp_path, [{"file": "exported.pt", "classes": names, "input": spec},
                         {"file": "scripted.pt2", "classes": names, "input": spec}])
    assert [external.program_format(tmp_path / f) for f in ("exported.pt", "scripted.pt2")] == ["export", "torchscript"]
    exported, scripted = external.load_zoo_dir(tmp_path, synthetic, WAY, "cpu")
    x = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(exported.model(x), built_in[0].model(x))
    assert isinstance(scripted.model.program, torch.jit.ScriptModule)


def test_export_program_is_moved_to_the_run_device_when_loaded(built_in, synthetic, tmp_path):
    """Another device than the CPU (here "meta", which every build has) takes torch.export's device pass."""
    external.export_zoo(built_in[:1], synthetic, tmp_path)
    program = external.load_program(tmp_path / "teacher_000.pt2", "export", torch.device("meta"))
    assert {t.device.type for t in (*program.parameters(), *program.buffers())} == {"meta"}
    assert program(torch.rand(2, 3, 16, 16, device="meta")).shape == (2, WAY)


def test_fit_input_passes_a_fitting_batch_through_unchanged():
    x = torch.rand(2, 3, 16, 16)
    assert external.fit_input(x, 16, 3) is x


# ---------------------------------------------------------------------------------- bad zoos
def valid_zoo(folder):
    """Two valid 5-class TorchScript teachers of 3x8x8 images on meta-train names."""
    save_script(Mlp(3, 8, 5), folder / "t0.pt")
    save_script(Mlp(3, 8, 5), folder / "t1.pt")
    return [entry("t0.pt", ["c00", "c01", "c02", "c03", "c04"], 8, 3),
            entry("t1.pt", ["c05", "c06", "c07", "c08", "c09"], 8, 3)]


def set_input(field, value):
    return lambda e, d: e[1]["input"].__setitem__(field, value)


def drop_input(field):
    return lambda e, d: e[1]["input"].pop(field)


def write_bytes(content):
    return lambda e, d: (d / "t1.pt").write_bytes(content)


def script_t1(module):
    return lambda e, d: save_script(module, d / "t1.pt")


def torch_save_t1(e, d):
    torch.save({"weights": torch.zeros(3)}, d / "t1.pt")


def broken_export_t1(e, d):
    """A zip that looks like a torch.export archive (archive_format, models/) but is not one."""
    with zipfile.ZipFile(d / "t1.pt", "w") as z:
        z.writestr("archive/archive_format", "pt2")
        z.writestr("archive/models/model.json", "{not json")


ENTRY_1 = "teacher 1 (t1.pt)"
BAD_ENTRIES = {  # id: (how entry 1 or its file is spoiled, what the message must contain)
    "entry-not-object": (lambda e, d: e.__setitem__(1, ["t1.pt"]), ["teacher 1", "entry"]),
    "file-missing-field": (lambda e, d: e[1].pop("file"), ["teacher 1", "file: expected this field"]),
    "file-not-string": (lambda e, d: e[1].__setitem__("file", 3), ["teacher 1", "file:", "3"]),
    "classes-missing": (lambda e, d: e[1].pop("classes"), [ENTRY_1, "classes"]),
    "classes-not-list": (lambda e, d: e[1].__setitem__("classes", "c05"), [ENTRY_1, "classes:"]),
    "classes-empty": (lambda e, d: e[1].__setitem__("classes", []), [ENTRY_1, "classes:"]),
    "classes-not-strings": (lambda e, d: e[1].__setitem__("classes", [5, 6, 7, 8, 9]), [ENTRY_1, "classes:"]),
    "classes-duplicate": (lambda e, d: e[1].__setitem__("classes", ["c05"] * 5), [ENTRY_1, "distinct"]),
    "classes-fewer-than-way": (lambda e, d: e[1].__setitem__("classes", ["c05", "c06"]),
                               [ENTRY_1, "classes:", "at least 5"]),
    "classes-meta-test": (lambda e, d: e[1].__setitem__("classes", ["c05", "c06", "c07", "c08", "c17"]),
                          [ENTRY_1, "classes:", "meta-test", "c17"]),
    "classes-meta-val": (lambda e, d: e[1].__setitem__("classes", ["c10", "c06", "c07", "c08", "c09"]),
                         [ENTRY_1, "classes:", "meta-validation", "c10"]),
    "input-missing": (lambda e, d: e[1].pop("input"), [ENTRY_1, "input:"]),
    "input-not-object": (lambda e, d: e[1].__setitem__("input", [8, 3]), [ENTRY_1, "input:"]),
    "size-zero": (set_input("size", 0), [ENTRY_1, "input.size:", "positive integer"]),
    "size-float": (set_input("size", 8.5), [ENTRY_1, "input.size:", "positive integer"]),
    "size-bool": (set_input("size", True), [ENTRY_1, "input.size:"]),
    "size-missing": (drop_input("size"), [ENTRY_1, "input.size:"]),
    "channels-negative": (set_input("channels", -3), [ENTRY_1, "input.channels:"]),
    "channels-two-in-colour-run": (lambda e, d: e[1]["input"].update(channels=2, mean=[0.5] * 2, std=[0.2] * 2),
                                   [ENTRY_1, "input.channels:"]),
    "mean-wrong-length": (set_input("mean", [0.5, 0.5]), [ENTRY_1, "input.mean:", "3 finite numbers"]),
    "mean-nan": (set_input("mean", [0.5, float("nan"), 0.5]), [ENTRY_1, "input.mean:"]),
    "mean-string": (set_input("mean", ["0.5", 0.5, 0.5]), [ENTRY_1, "input.mean:"]),
    "std-zero": (set_input("std", [0.2, 0.0, 0.2]), [ENTRY_1, "input.std:", "positive"]),
    "std-missing": (drop_input("std"), [ENTRY_1, "input.std:"]),
    "file-absent": (lambda e, d: (d / "t1.pt").unlink(), [ENTRY_1, "file:", "none"]),
    "file-garbage": (write_bytes(b"not a program" * 20), [ENTRY_1, "file:", "torch.export", "TorchScript"]),
    "file-torch-save-checkpoint": (torch_save_t1, [ENTRY_1, "file:", "neither"]),
    "file-broken-export-archive": (broken_export_t1, [ENTRY_1, "file:", "unreadable"]),
    "probe-raises-wrong-input-size": (script_t1(Mlp(3, 6, 5)), [ENTRY_1, "file:", "raised"]),
    "probe-wrong-number-of-logits": (script_t1(Mlp(3, 8, 6)), [ENTRY_1, "classes:", "(2, 5)", "(2, 6)"]),
    "probe-non-finite-logits": (script_t1(Mlp(3, 8, 5, mode="nan")), [ENTRY_1, "file:", "finite"]),
    "probe-no-gradient-to-input": (script_t1(Mlp(3, 8, 5, mode="detach")), [ENTRY_1, "file:", "differentiable"]),
}


@pytest.mark.parametrize("spoil, expected", BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_bad_zoo_entry_is_one_user_error_naming_the_entry_and_field(tmp_path, spoil, expected):
    entries = valid_zoo(tmp_path)
    spoil(entries, tmp_path)
    (tmp_path / external.ZOO_JSON).write_text(json.dumps({"teachers": entries}))
    with pytest.raises(UserError) as info:
        external.load_zoo_dir(tmp_path, fake_dataset(3, 8), WAY, "cpu")
    message = str(info.value)
    assert str(tmp_path / external.ZOO_JSON) in message and "\n" not in message
    for part in expected:
        assert part in message


BAD_FILES = {  # id: (zoo.json's content or None for no file, what the message must contain)
    "no-zoo-json": (None, ["expected zoo.json in it, found none"]),
    "not-json": ("{teachers: [", ["zoo.json", "unreadable"]),
    "not-an-object": ("[1, 2]", ["zoo.json", "found a list"]),
    "no-teachers": ('{"zoo": []}', ["zoo.json", "teachers:", "found none"]),
    "empty-teachers": ('{"teachers": []}', ["zoo.json", "teachers:", "non-empty"]),
}


@pytest.mark.parametrize("content, expected", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_missing_or_malformed_zoo_json_is_one_user_error(tmp_path, content, expected):
    if content is not None:
        (tmp_path / external.ZOO_JSON).write_text(content)
    with pytest.raises(UserError) as info:
        external.load_zoo_dir(tmp_path, fake_dataset(3, 8), WAY, "cpu")
    assert str(tmp_path) in str(info.value)
    for part in expected:
        assert part in str(info.value)


def test_every_entry_is_checked_before_any_program_is_loaded(tmp_path):
    """Entry 0's file is garbage and entry 1 lacks its classes: the field error of entry 1 comes first."""
    entries = valid_zoo(tmp_path)
    (tmp_path / "t0.pt").write_bytes(b"garbage")
    entries[1].pop("classes")
    (tmp_path / external.ZOO_JSON).write_text(json.dumps({"teachers": entries}))
    with pytest.raises(UserError, match=r"teacher 1 \(t1\.pt\): classes"):
        external.load_zoo_dir(tmp_path, fake_dataset(3, 8), WAY, "cpu")


# ---------------------------------------------------------------------------------- the built-in cache
def test_unreadable_cached_teacher_is_retrained_alone_with_one_log_line(synthetic, tmp_path):
    root = tmp_path / "cache"
    first = zoo.build_zoo(synthetic, "conv4", 3, WAY, 0, "tiny", TINY, root, "cpu")
    folder = zoo.zoo_dir(root, "synthetic", "conv4", 3, WAY, 0, "tiny")
    damaged = zoo.teacher_path(folder, 1)
    damaged.write_bytes(b"garbage" * 50)
    untouched = {i: zoo.teacher_path(folder, i).stat().st_mtime_ns for i in (0, 2)}
    lines = []
    again = zoo.build_zoo(synthetic, "conv4", 3, WAY, 0, "tiny", TINY, root, "cpu", log=lines.append)
    retrain = [line for line in lines if "retraining" in line]
    assert retrain == [f"teacher file {damaged} is unreadable (UnpicklingError); retraining it"]
    assert [line.split()[-1] for line in lines[1:4]] == ["cached", "left", "cached"]  # only teacher 2 of 3 trained
    assert "(1 trained, 2 cached)" in lines[-1]
    assert {i: zoo.teacher_path(folder, i).stat().st_mtime_ns for i in (0, 2)} == untouched
    zoo.load_checkpoint(damaged, UserError, "teacher file", "")  # readable again
    for a, b in zip(first, again):  # training is seeded by (seed, index): the same teacher comes back
        assert a.classes == b.classes
        for (n, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            assert torch.equal(p, q), n
