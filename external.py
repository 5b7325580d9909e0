"""Teachers from elsewhere: a zoo of pre-trained classifiers that this project did not train, the input of
data-free meta-learning as its users hold it (paper §1: the zoo is all the method sees). Ours: the paper and
the authors' code read their own checkpoints only.

A folder holds zoo.json and one program per teacher, torch.export (.pt2) or TorchScript (.pt), of any
architecture and input format, with class names instead of ids:

    {"teachers": [{"file": "t0.pt2", "classes": ["apple", "bee", "car", "dog", "eel"],
                   "input": {"size": 32, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}]}

A program takes [n, channels, size, size] images already normalised by (x - mean) / std and returns
[n, len(classes)] logits. load_zoo_dir wraps each so that it takes the run's images in [0, 1] like a
built-in teacher (ExternalTeacher, through fit_input); a class name of the run's data set keeps its id
there, other names get new ids after them (global_ids); restrict() shows a teacher of more than `way`
classes to Eq. (1), L_adv and KD as a `way`-way one; export_zoo writes a built-in zoo (zoo.py) in this format.
"""
import copy
import hashlib
import json
import math
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.export.passes import move_to_device_pass

from data import UserError, atomic_write
from models import Normalize
from zoo import Teacher

ZOO_JSON = "zoo.json"
EXTERNAL_ARCH = "external"  # Teacher.arch of a teacher of an external zoo
EXPORT_SUFFIX = ".pt2"  # torch.export.save's customary suffix (TorchScript: .pt)
EXPORT_EXAMPLE_BATCH = 2  # batch of the example input torch.export traces with (the batch dimension stays dynamic)
PROBE_BATCH = 2  # images of the probe forward that checks each external teacher at load
DIGEST_CHUNK = 1 << 20  # bytes read at a time when hashing the teachers' files
PROBE_SEED = 0  # the probe images come from their own generator: loading leaves the run's RNG as it was
# what torch.export.load / torch.jit.load raise for a damaged or foreign archive (torch 2.13)
PROGRAM_LOAD_ERRORS = (RuntimeError, ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile,
                       pickle.UnpicklingError)
# what a program's forward raises on input it cannot take (torch.jit.Error is a RuntimeError; a torch.export
# program's shape guard raises AssertionError)
PROBE_ERRORS = (RuntimeError, AssertionError, ValueError, TypeError, IndexError)


def fit_input(x, size, channels):
    """Images x [n, C, H, W] in [0, 1] -> [n, channels, size, size], a teacher's (or probe model's) input
    format: grey -> colour repeats the channel, colour -> grey averages the channels, then a bilinear resize
    (align_corners=False: half-pixel centres). Returns x itself when it fits; differentiable in x."""
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)  # grey -> repeated channels, [n, channels, H, W]
        elif channels == 1:
            x = x.mean(dim=1, keepdim=True)  # colour -> grey, [n, 1, H, W]
        else:
            raise ValueError(f"cannot map {x.shape[1]}-channel images to {channels} channels; expected "
                             f"the same count, or 1 on either side")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # [n, channels, size, size]
    return x


class ExternalTeacher(torch.nn.Module):
    """A teacher of an external zoo as the run sees it, like a built-in teacher (models.py): images in [0, 1]
    at the run's size and channels, logits out:

        forward(x) = program((fit_input(x, size, channels) - mean) / std)

    Its parameters are frozen, but gradients flow to x (Eq. (1) differentiates through the teacher). It
    stays in eval mode: a teacher is a fixed function, and a torch.export program cannot switch modes."""

    def __init__(self, program, size, channels, mean, std):
        super().__init__()
        self.program = program
        self.size, self.channels = size, channels
        self.normalize = Normalize(mean, std)  # the same (x - mean) / std as a built-in teacher's
        self.requires_grad_(False)
        self.training = False

    def forward(self, x):
        return self.program(self.normalize(fit_input(x, self.size, self.channels)))  # [n, classes]

    def train(self, mode=True):
        """No-op: the teacher stays in eval mode (model.eval() and model.train() of callers are harmless)."""
        return self


class ClassSubset(torch.nn.Module):
    """A teacher seen through some of its classes: logits [n, len(columns)] = the teacher's [n, K] logits at
    `columns` (so Eq. (1), L_adv and KD see a `way`-way teacher)."""

    def __init__(self, model, columns):
        super().__init__()
        self.model = model
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.int64), persistent=False)
        self.train(model.training)

    def forward(self, x):
        logits = self.model(x)  # [n, K]
        return logits.index_select(1, self.columns.to(logits.device))  # [n, way]


def restrict(teacher, way, generator):
    """A `way`-way view of `teacher`: `way` of its K classes drawn by torch.randperm(K, generator=generator),
    kept in the teacher's order. -> (model, global ids of the drawn classes). A teacher of exactly `way`
    classes is returned as it is (its model and classes), drawing nothing from `generator`; one of fewer
    classes raises UserError. `generator`: a seeded CPU torch.Generator, the same on every worker."""
    k = len(teacher.classes)
    if k < way:
        raise UserError(f"teacher {teacher.index}{describe_file(teacher.file)} holds {k} classes; a {way}-way run "
                        f"needs at least {way}; lower --way or leave that teacher out of the zoo")
    if k == way:
        return teacher.model, list(teacher.classes)
    columns = sorted(torch.randperm(k, generator=generator)[:way].tolist())
    return ClassSubset(teacher.model, columns), [teacher.classes[c] for c in columns]


def describe_file(file):
    return "" if file is None else f" ({file})"


def program_format(path):
    """'export' (torch.export.save) or 'torchscript' (torch.jit.save), told apart by the zip archive's
    member names, '<prefix>/archive_format' and '<prefix>/models/...' against '<prefix>/constants.pkl' and
    '<prefix>/code/...' (torch 2.13); None for anything else (a torch.save checkpoint has neither)."""
    try:
        with zipfile.ZipFile(path) as z:
            tails = {name.split("/", 1)[1] for name in z.namelist() if "/" in name}  # names below the prefix
    except (zipfile.BadZipFile, OSError):
        return None
    if "archive_format" in tails or any(t.startswith("models/") for t in tails):
        return "export"
    if "constants.pkl" in tails and any(t.startswith("code/") for t in tails):
        return "torchscript"
    return None


def load_program(path, kind, device):
    """The program in `path` (kind from program_format) on `device`, as a callable module."""
    if kind == "export":
        with open(path, "rb") as f:  # a file object: torch.export.load wants a path to end in .pt2
            program = torch.export.load(f)
        if device.type != "cpu":
            program = move_to_device_pass(program, device)
        return program.module()
    return torch.jit.load(path, map_location=device).eval()


def entry_error(where, field, expected, found, fix):
    """The one UserError of a bad zoo.json entry: which entry (`where`), which field, what was expected and
    found, what to do."""
    return UserError(f"{where}: {field}: expected {expected}, found {found}; {fix}")


def is_finite_number(v):
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))


def is_positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_entry(entry, where, ds, way, avoid):
    """One entry of zoo.json, field by field (no file is opened). -> (file, names, size, channels, mean, std).
    `avoid`: class names of the meta-validation and meta-test splits, which no teacher may hold."""
    fix = f"fix this entry of {ZOO_JSON}"
    if not isinstance(entry, dict):
        raise entry_error(where, "entry", "an object with file, classes and input", type(entry).__name__, fix)
    for field in ("file", "classes", "input"):
        if field not in entry:
            raise entry_error(where, field, "this field", "none", fix)
    file, names, spec = entry["file"], entry["classes"], entry["input"]
    if not isinstance(file, str) or not file:
        raise entry_error(where, "file", "a file name (string)", repr(file), fix)
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names)
            or len(set(names)) != len(names)):
        raise entry_error(where, "classes", "a non-empty list of distinct class names (strings)", repr(names), fix)
    if len(names) < way:
        raise entry_error(where, "classes", f"at least {way} classes for a {way}-way run", f"{len(names)}",
                          "lower --way or leave this teacher out")
    if not isinstance(spec, dict):
        raise entry_error(where, "input", "an object with size, channels, mean, std", repr(spec), fix)
    for field in ("size", "channels", "mean", "std"):
        if field not in spec:
            raise entry_error(where, f"input.{field}", "this field", "none", fix)
    size, channels = spec["size"], spec["channels"]
    for field, v in (("size", size), ("channels", channels)):
        if not is_positive_int(v):
            raise entry_error(where, f"input.{field}", "a positive integer", repr(v), fix)
    if channels != ds.channels and 1 not in (channels, ds.channels):
        raise entry_error(where, "input.channels", f"{ds.channels} or 1 (the run's images have {ds.channels})",
                          channels, "use a teacher of this data set's channel count")
    for field in ("mean", "std"):
        v = spec[field]
        if (not isinstance(v, list) or len(v) != channels
                or not all(is_finite_number(a) for a in v)):
            raise entry_error(where, f"input.{field}", f"a list of {channels} finite numbers (one per channel)",
                              repr(v), fix)
    if not all(a > 0 for a in spec["std"]):
        raise entry_error(where, "input.std", "positive numbers", repr(spec["std"]), fix)
    held = sorted(set(names) & avoid)
    if held:
        raise entry_error(where, "classes", f"no class of {ds.name}'s meta-validation or meta-test split (the "
                          f"meta-test must be on classes no teacher holds)", f"{held[:5]}",
                          "leave this teacher out or pick another data set")
    return file, names, size, channels, [float(a) for a in spec["mean"]], [float(a) for a in spec["std"]]


def read_zoo_json(folder):
    """The list of teacher entries of `folder`/zoo.json; UserError when absent, unreadable or not the format."""
    path = Path(folder) / ZOO_JSON
    fmt = '{"teachers": [{"file": ..., "classes": [...], "input": {...}}, ...]}'
    if not path.is_file():
        raise UserError(f"external zoo {folder}: expected {ZOO_JSON} in it, found none; pass the folder that "
                        f"holds {ZOO_JSON} and the teachers' files")
    try:
        body = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: expected JSON of the form {fmt}; it is unreadable ({e}); fix the file") from e
    if not isinstance(body, dict):
        raise UserError(f"{path}: expected an object {fmt}, found a {type(body).__name__}; fix the file")
    teachers = body.get("teachers")
    if not isinstance(teachers, list) or not teachers:
        raise UserError(f"{path}: teachers: expected a non-empty list of teachers ({fmt}), found "
                        f"{'none' if teachers is None else repr(teachers)[:80]}; fix the file")
    return path, teachers


def global_ids(names_per_teacher, class_names):
    """Global class ids of the names: a name of the data set keeps its id (class_names.index(name)); the
    others get len(class_names) + i, i their rank among the zoo's new names in sorted order. A name two
    teachers share is one class."""
    ids = {}
    for i, name in enumerate(class_names):
        ids.setdefault(name, i)
    new = sorted({n for names in names_per_teacher for n in names if n not in ids})
    ids.update({name: len(class_names) + i for i, name in enumerate(new)})
    return [[ids[n] for n in names] for names in names_per_teacher]


def probe_teacher(model, where, n_classes, ds, device):
    """One forward of PROBE_BATCH random images of the run's format through the wrapped teacher: it must run,
    give [PROBE_BATCH, n_classes] finite logits, and let gradients reach the images (Eq. (1))."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.rand(PROBE_BATCH, ds.channels, ds.image_size, ds.image_size, generator=g).to(device)
    x.requires_grad_()
    fix = "check the program against this entry's input and classes"
    try:
        logits = model(x)
    except PROBE_ERRORS as e:
        last = (str(e).strip().splitlines() or [""])[-1][:200]  # TorchScript: the error under its traceback
        what = last if last.startswith(type(e).__name__) else f"{type(e).__name__}: {last}"
        raise entry_error(where, "file", f"a program that takes [{PROBE_BATCH}, {model.channels}, {model.size}, "
                          f"{model.size}] images", f"one that raised {what}", fix) from e
    if not torch.is_tensor(logits) or tuple(logits.shape) != (PROBE_BATCH, n_classes):
        found = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise entry_error(where, "classes", f"logits of shape {(PROBE_BATCH, n_classes)} (one per class)",
                          f"{found}", fix)
    if not torch.isfinite(logits).all():
        raise entry_error(where, "file", "finite logits", "inf or nan", fix)
    if not logits.requires_grad:
        raise entry_error(where, "file", "logits differentiable in the input images (recovery, Eq. (1), needs "
                          "dL/dx)", "logits without a gradient", "export the program without no_grad or detach")


def load_zoo_dir(folder, dataset, way, device, log=None):
    """The teachers of the external zoo in `folder` (see the module docstring), for a `way`-way run on
    `dataset`: every entry of zoo.json is checked (fields, files present, at least `way` classes, none of
    the meta-validation or meta-test classes) before any program is loaded; then each program is loaded on
    `device`, wrapped (ExternalTeacher) and checked by one probe forward. Any failure raises one UserError
    naming the entry and the field. Teacher.classes are global ids (global_ids), Teacher.acc is None.
    `log` (a callable taking one string) receives one line per teacher."""
    log = log or (lambda line: None)
    device = torch.device(device)
    folder = Path(folder)
    path, entries = read_zoo_json(folder)
    avoid = {dataset.class_names[c] for s in ("val", "test") for c in dataset.splits[s].classes}
    checked = []  # (where, file, names, size, channels, mean, std) per entry
    for i, entry in enumerate(entries):
        file = entry.get("file") if isinstance(entry, dict) else None
        where = f"{path} teacher {i}" + (f" ({file})" if isinstance(file, str) else "")
        fields = check_entry(entry, where, dataset, way, avoid)
        if not (folder / fields[0]).is_file():
            raise entry_error(where, "file", f"a file {folder / fields[0]}", "none",
                              f"put the teacher's program there or fix the file name in {ZOO_JSON}")
        checked.append((where, *fields))
    ids = global_ids([names for _, _, names, *_ in checked], dataset.class_names)
    teachers = []
    for i, ((where, file, names, size, channels, mean, std), classes) in enumerate(zip(checked, ids)):
        model = load_wrapped(folder / file, where, size, channels, mean, std, device)
        probe_teacher(model, where, len(names), dataset, device)
        teachers.append(Teacher(model, classes, EXTERNAL_ARCH, None, i, class_names=list(names), file=file))
        log(f"teacher {i + 1:3d}/{len(entries)} {EXTERNAL_ARCH} {file}: {len(names)} classes, input "
            f"{channels}x{size}x{size}")
    return teachers


def load_wrapped(path, where, size, channels, mean, std, device):
    """The program in `path` wrapped as an ExternalTeacher on `device`; UserError naming the entry when the
    file is neither a torch.export nor a TorchScript archive, or cannot be loaded."""
    kind = program_format(path)
    if kind is None:
        raise entry_error(where, "file", "a torch.export program (torch.export.save) or a TorchScript module "
                          "(torch.jit.save)", "neither", "save the teacher with one of them")
    try:
        program = load_program(path, kind, device)
    except PROGRAM_LOAD_ERRORS as e:
        raise entry_error(where, "file", f"a readable {kind} archive", f"an unreadable one ({type(e).__name__})",
                          "write the file again") from e
    return ExternalTeacher(program, size, channels, mean, std).to(device)


def export_program(model):
    """torch.export program of a built-in teacher without its Normalize: a CPU copy whose normalize is the
    identity (same layers, parameter names and weights), traced in eval mode with a dynamic batch dimension;
    it takes [n, C, S, S] images already normalised by the teacher's (x - mean) / std."""
    body = copy.deepcopy(model).cpu().eval()
    body.normalize = torch.nn.Identity()  # the zoo format: the caller normalises
    c, s = model.arch["in_channels"], model.arch["image_size"]
    example = torch.zeros(EXPORT_EXAMPLE_BATCH, c, s, s)  # [B, C, S, S]
    return torch.export.export(body, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))


def export_zoo(teachers, dataset, folder):
    """Write built-in `teachers` (of `dataset`) as an external zoo in `folder`: teacher_XXX.pt2 per teacher
    (export_program) and zoo.json with its class names (dataset.class_names) and input format (the teacher's
    size, channels and own Normalize buffers: the data set's). load_zoo_dir reads it back to the same logits
    and class ids. Every file is written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for t in teachers:
        name = f"teacher_{t.index:03d}{EXPORT_SUFFIX}"
        program = export_program(t.model)
        atomic_write(folder / name, lambda f: torch.export.save(program, f))
        norm = t.model.normalize
        entries.append({"file": name, "classes": [dataset.class_names[c] for c in t.classes],
                        "input": {"size": t.model.arch["image_size"], "channels": t.model.arch["in_channels"],
                                  "mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()}})
    body = json.dumps({"teachers": entries}, indent=1)
    atomic_write(folder / ZOO_JSON, lambda f: f.write(body.encode()))


def parameters_like(teacher, meta_learner):
    """`average` baseline: the teacher's parameters under the meta-learner's names, all but the head (a fresh
    head is drawn): {name: tensor}. A built-in teacher's own names; an external teacher's are its program's
    (export_zoo keeps models.Conv4's names). UserError when the teacher has not every such parameter with
    the meta-learner's shape."""
    source = teacher.model.program if isinstance(teacher.model, ExternalTeacher) else teacher.model
    have = dict(source.named_parameters())
    want = {n: p for n, p in meta_learner.named_parameters() if not n.startswith("head.")}
    wrong = [n for n, p in want.items() if n not in have or have[n].shape != p.shape]
    if wrong:
        found = (f"no {wrong[0]}" if wrong[0] not in have else
                 f"{wrong[0]} of shape {tuple(have[wrong[0]].shape)}, not {tuple(want[wrong[0]].shape)}")
        raise UserError(f"--method average needs Conv4 teachers whose parameters are named like models.Conv4's "
                        f"(e.g. {next(iter(want))}); teacher {teacher.index}{describe_file(teacher.file)} "
                        f"({teacher.arch}) has {found}; use a zoo of such teachers or another --method")
    return {n: have[n].detach() for n in want}


def zoo_digest(folder):
    """SHA-256 of zoo.json and of every file it names, in its order: a run from `folder` is resumed only with
    the same teachers (a missing or unreadable file is left to load_zoo_dir to name)."""
    h = hashlib.sha256()
    path, entries = read_zoo_json(folder)
    h.update(path.read_bytes())
    for entry in entries:
        file = Path(folder) / str(entry.get("file", "")) if isinstance(entry, dict) else None
        if file is not None and file.is_file():
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(DIGEST_CHUNK), b""):
                    h.update(chunk)
    return h.hexdigest()
