"""Tests of data.py (data sets, downloads, task sampling) and zoo.py (the teacher zoo).

CPU only, deterministic, no internet, nothing read outside the repository and the tests' temporary
folders: the CIFAR-100, CUB and Omniglot download paths are exercised against tiny archives of the
same formats, built here and served from 127.0.0.1; the zoo trains a few tiny Conv4 teachers on the
synthetic data set.
"""
import copy
import hashlib
import http.server
import io
import json
import pickle
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import zoo

# a small Omniglot background set in the official layout: the alphabets of images_background_small1
OMNIGLOT_SMALL = {"Balinese": 3, "Early_Aramaic": 2, "Greek": 3, "Korean": 4, "Latin": 3}  # characters each
OMNIGLOT_DRAWINGS = 20
CIFAR100_FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()
CUB_CLASSES = [f"{i + 1:03d}.Bird_{i}" for i in range(8)]  # tiny CUB: 8 class folders
TINY_ZOO = zoo.ZooSettings(epochs=3, batch_size=32)  # a few seconds for 3 teachers on the CPU


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, more threads mostly wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Tiny archives and a local HTTP server
# ----------------------------------------------------------------------------------------------
def add_bytes(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def tiny_cifar100(per_class_train=2, per_class_test=1):
    """A cifar-100-python.tar.gz with all 100 fine names; every pixel of an image = its label."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for part, k in (("train", per_class_train), ("test", per_class_test)):
            labels = [c for c in range(100) for _ in range(k)]
            pixels = np.repeat(np.array(labels, dtype=np.uint8)[:, None], 3072, axis=1)
            d = {"data": pixels, "fine_labels": labels, "coarse_labels": [0] * len(labels)}
            add_bytes(tar, f"cifar-100-python/{part}", pickle.dumps(d, protocol=2))
        add_bytes(tar, "cifar-100-python/meta", pickle.dumps({"fine_label_names": CIFAR100_FINE}))
    return buf.getvalue()


def jpeg(colour, size=(12, 10)):
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG")
    return out.getvalue()


def tiny_cub():
    """A CUB_200_2011.tgz with 8 class folders of 2 tiny JPEGs each (colour encodes the class)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        add_bytes(tar, "CUB_200_2011/README", b"tiny")
        for i, c in enumerate(CUB_CLASSES):
            for j in range(2):
                add_bytes(tar, f"CUB_200_2011/images/{c}/img_{j}.jpg", jpeg((20 * i, 0, 0)))
    return buf.getvalue()


def md5(payload):
    return hashlib.md5(payload).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves Handler.files[path]; under /truncated/ it announces more bytes than it sends."""
    files = {}

    def do_GET(self):
        truncated = self.path.startswith("/truncated/")
        body = self.files.get(self.path.replace("/truncated", "", 1))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (1000 if truncated else 0)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if truncated else body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def archives():
    return {"cifar": tiny_cifar100(), "cub": tiny_cub()}


@pytest.fixture(scope="module")
def server(archives):
    Handler.files = {"/" + data.CIFAR_FILE: archives["cifar"], "/" + data.CUB_FILE: archives["cub"]}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def right_md5(monkeypatch, archives):
    monkeypatch.setattr(data, "CIFAR_MD5", md5(archives["cifar"]))
    monkeypatch.setattr(data, "CUB_MD5", md5(archives["cub"]))


def leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".part")]


# ----------------------------------------------------------------------------------------------
# Downloads, CIFAR-FS, CUB
# ----------------------------------------------------------------------------------------------
def test_download_with_right_md5_is_accepted_and_gives_cifarfs_split(tmp_path, server, right_md5):
    ds = data.load_dataset("cifarfs", tmp_path, mirror=server)
    assert (tmp_path / data.CIFAR_FILE).is_file() and not leftovers(tmp_path)
    assert [len(ds.splits[s].classes) for s in ("train", "val", "test")] == [64, 16, 20]
    name_of = ds.class_names
    assert {name_of[c] for c in ds.splits["test"].classes} == set(data.CIFARFS_TEST)
    assert {name_of[c] for c in ds.splits["val"].classes} == set(data.CIFARFS_VAL)
    assert "apple" in {name_of[c] for c in ds.splits["train"].classes}
    train = ds.splits["train"]
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    # every pixel of a tiny-archive image equals its fine label: labels and pixels stay paired
    assert torch.equal(train.images[:, 0, 0, 0].long(), train.labels)
    assert np.allclose(ds.mean, [train.images.double().mean().item() / 255] * 3)


def test_existing_file_with_right_md5_is_not_downloaded_again(tmp_path, server, right_md5):
    data.load_dataset("cifarfs", tmp_path, mirror=server)
    ds = data.load_dataset("cifarfs", tmp_path, mirror="http://127.0.0.1:9/nowhere/")
    assert len(ds.splits["train"].classes) == 64


def test_wrong_md5_is_rejected_partial_removed_earlier_file_kept(tmp_path, server, archives,
                                                                 monkeypatch):
    earlier = tmp_path / data.CIFAR_FILE
    earlier.write_bytes(archives["cifar"])
    monkeypatch.setattr(data, "CIFAR_MD5", "0" * 32)
    with pytest.raises(data.DataError, match="expected 0{32}"):
        data.load_dataset("cifarfs", tmp_path, mirror=server)
    assert earlier.read_bytes() == archives["cifar"] and not leftovers(tmp_path)


def test_truncated_download_is_a_clear_error_and_leaves_nothing(tmp_path, server, right_md5):
    with pytest.raises(data.DataError, match="truncated: expected .* bytes"):
        data.load_dataset("cifarfs", tmp_path, mirror=server + "/truncated/")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_data_root_is_reported_plainly(tmp_path, server, right_md5):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(data.DataError, match="cannot write to the data root"):
        data.load_dataset("cifarfs", blocker / "data", mirror=server)


def test_cub_split_by_folder_index_and_npz_cache_reused(tmp_path, server, right_md5, monkeypatch):
    ds = data.load_dataset("cub", tmp_path, mirror=server)
    assert ds.class_names == CUB_CLASSES
    assert ds.splits["train"].classes == [0, 2, 4, 6]  # i % 2 == 0
    assert ds.splits["val"].classes == [1, 5]  # i % 4 == 1
    assert ds.splits["test"].classes == [3, 7]  # i % 4 == 3
    assert ds.splits["train"].images.shape == (8, 3, 84, 84)
    red = ds.splits["test"].images[:, 0].float().mean(dim=(1, 2))  # colour encodes the class
    assert torch.allclose(red, 20.0 * ds.splits["test"].labels.float(), atol=4)
    assert (tmp_path / "cub_84.npz").is_file()

    def no_decoding(*args):
        raise AssertionError("decoded the JPEGs again despite the npz cache")

    monkeypatch.setattr(data, "decode_cub", no_decoding)
    (tmp_path / data.CUB_FILE).unlink()  # the cache alone must suffice
    again = data.load_dataset("cub", tmp_path, mirror=server)
    assert torch.equal(again.splits["val"].images, ds.splits["val"].images)


def test_missing_miniimagenet_caches_error_names_files_and_folder(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.load_dataset("miniimagenet", tmp_path)
    message = str(err.value)
    for f in data.MINI_FILES.values():
        assert f in message
    assert str(tmp_path / "miniimagenet") in message and "README" in message


def write_tiny_miniimagenet(root, per_class=3):
    """Pickle caches with 2 classes per split; every pixel of an image = 10 * split + class."""
    folder = root / "miniimagenet"
    folder.mkdir(parents=True)
    for s_i, (s, f) in enumerate(data.MINI_FILES.items()):
        pixel = np.repeat([10 * s_i, 10 * s_i + 1], per_class).astype(np.uint8)
        images = np.broadcast_to(pixel[:, None, None, None], (len(pixel), 84, 84, 3)).copy()
        class_dict = {f"n0{s_i}b": list(range(per_class, 2 * per_class)),
                      f"n0{s_i}a": list(range(per_class))}
        with open(folder / f, "wb") as fh:
            pickle.dump({"image_data": images, "class_dict": class_dict}, fh)


def test_miniimagenet_caches_give_sorted_disjoint_classes_per_split(tmp_path):
    write_tiny_miniimagenet(tmp_path)
    ds = data.load_dataset("miniimagenet", tmp_path)
    assert ds.class_names == ["n00a", "n00b", "n01a", "n01b", "n02a", "n02b"]
    assert [ds.splits[s].classes for s in ("train", "val", "test")] == [[0, 1], [2, 3], [4, 5]]
    val = ds.splits["val"]
    assert val.images.shape == (6, 3, 84, 84)
    assert val.images[:, 0, 0, 0].tolist() == [10, 10, 10, 11, 11, 11]  # class "a" first
    assert val.labels.tolist() == [2, 2, 2, 3, 3, 3]


def test_mix_offsets_class_ids_per_domain_at_84(tmp_path, server, right_md5):
    write_tiny_miniimagenet(tmp_path)
    ds = data.load_dataset("mix", tmp_path, mirror=server)
    assert (ds.image_size, ds.channels) == (84, 3)
    assert len(ds.class_names) == 100 + 6 + 8 == len(ds.domain_of_class)
    assert ds.domain_of_class[99] == "cifarfs" and ds.domain_of_class[100] == "miniimagenet"
    assert ds.domain_of_class[106] == "cub" and ds.class_names[106] == "cub:" + CUB_CLASSES[0]
    train = ds.splits["train"]
    assert len(train.classes) == 64 + 2 + 4 and train.images.shape[1:] == (3, 84, 84)
    cifar_train = train.images[train.labels < 100]
    assert torch.equal(cifar_train[:, 0, 40, 40].long(), train.labels[train.labels < 100])


# ----------------------------------------------------------------------------------------------
# Omniglot
# ----------------------------------------------------------------------------------------------
def stroke_png(character=0, drawing=0):
    """A 105x105 1-bit PNG as in Omniglot: white page, one black stroke placed by character and drawing."""
    img = Image.new("1", (105, 105), 1)  # white page
    x = 10 + 7 * (character % 10) + drawing % 3
    img.paste(0, (x, 20, x + 20, 90))  # one black stroke
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def omniglot_zip(top, alphabets, drawings=OMNIGLOT_DRAWINGS):
    """An Omniglot-layout zip: <top>/<alphabet>/character<NN>/<drawing>.png."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for a, n in alphabets.items():
            for c in range(n):
                for j in range(drawings):
                    z.writestr(f"{top}/{a}/character{c + 1:02d}/{j:02d}.png", stroke_png(c, j))
    return buf.getvalue()


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    root = tmp_path_factory.mktemp("omniglot")
    (root / "images_background_small1.zip").write_bytes(omniglot_zip("images_background_small1", OMNIGLOT_SMALL))
    return data.load_dataset("omniglot", root)


def test_omniglot_has_its_characters_of_20_bright_stroke_images(omniglot):
    assert len(omniglot.class_names) == sum(OMNIGLOT_SMALL.values())
    assert (omniglot.image_size, omniglot.channels) == (28, 1)
    for split in omniglot.splits.values():
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 28, 28)
        assert torch.bincount(split.labels)[split.classes].eq(OMNIGLOT_DRAWINGS).all()
    x = omniglot.splits["train"].images.float()
    assert x.median() == 0 and x.mean() < 60 and x.amax() == 255  # dark page, bright strokes


def test_omniglot_small_set_split_korean_test_latin_val_rest_train(omniglot):
    def alphabets(s):
        return {omniglot.class_names[c].split("/")[0] for c in omniglot.splits[s].classes}

    sizes = {s: len(omniglot.splits[s].classes) for s in ("train", "val", "test")}
    assert sizes == {"train": 3 + 2 + 3, "val": 3, "test": 4}
    assert alphabets("test") == {"Korean"} and alphabets("val") == {"Latin"}
    assert alphabets("train") == {"Balinese", "Early_Aramaic", "Greek"}
    classes = [set(omniglot.splits[s].classes) for s in ("train", "val", "test")]
    assert not (classes[0] & classes[1] or classes[0] & classes[2] or classes[1] & classes[2])


def test_omniglot_downloads_both_sets_splits_them_and_decodes_once(tmp_path, server, monkeypatch):
    """No local copy: images_background.zip and images_evaluation.zip come from the (local) mirror with
    their MD5s; evaluation alphabets are meta-test, the named background alphabets meta-val; the second
    load reads the decoded cache (the zips may even be gone)."""
    background = omniglot_zip("images_background", {"Latin": 2, "Greek": 1, "Tifinagh": 3, "Braille": 2}, 4)
    evaluation = omniglot_zip("images_evaluation", {"Kannada": 2, "Oriya": 1}, 4)
    Handler.files.update({"/images_background.zip": background, "/images_evaluation.zip": evaluation})
    monkeypatch.setattr(data, "OMNIGLOT_FILES", {"images_background.zip": md5(background),
                                                 "images_evaluation.zip": md5(evaluation)})
    ds = data.load_dataset("omniglot", tmp_path, mirror=server)

    def alphabets(s):
        return sorted({ds.class_names[c].split("/")[0] for c in ds.splits[s].classes})

    assert alphabets("train") == ["Braille", "Tifinagh"] and alphabets("val") == ["Greek", "Latin"]
    assert alphabets("test") == ["Kannada", "Oriya"] and len(ds.splits["test"].classes) == 3
    folder = tmp_path / data.OMNIGLOT_DIR
    assert sorted(p.name for p in folder.glob("*.zip")) == ["images_background.zip", "images_evaluation.zip"]
    assert not leftovers(folder)

    def no_decoding(*args):
        raise AssertionError("decoded the PNGs again despite the cache")

    monkeypatch.setattr(data, "decode_omniglot", no_decoding)
    again = data.load_dataset("omniglot", tmp_path, mirror=server)
    assert again.class_names == ds.class_names
    assert all(torch.equal(again.splits[s].images, ds.splits[s].images) for s in ds.splits)


def test_omniglot_download_with_wrong_md5_is_refused(tmp_path, server, monkeypatch):
    Handler.files["/images_background.zip"] = omniglot_zip("images_background", {"Latin": 1}, 2)
    monkeypatch.setattr(data, "OMNIGLOT_FILES", {"images_background.zip": "0" * 32,
                                                 "images_evaluation.zip": "0" * 32})
    with pytest.raises(data.DataError, match="images_background.zip from .* has MD5"):
        data.load_dataset("omniglot", tmp_path, mirror=server)
    assert not list((tmp_path / data.OMNIGLOT_DIR).iterdir())


def test_omniglot_local_folder_and_zip_evaluation_set_is_meta_test(tmp_path):
    """A background folder beside an evaluation zip: evaluation alphabets meta-test, Latin (one of the
    held-out background alphabets) meta-val, Tifinagh meta-train; folders are read in place."""
    png = stroke_png()
    for alphabet in ("Latin", "Tifinagh"):
        for character in ("character01", "character02"):
            folder = tmp_path / "images_background" / alphabet / character
            folder.mkdir(parents=True)
            for j in range(3):
                (folder / f"{j}.png").write_bytes(png)
    with zipfile.ZipFile(tmp_path / "images_evaluation.zip", "w") as z:
        for j in range(3):  # a top folder inside the zip, as in the official archives
            z.writestr(f"images_evaluation/Korean/character01/{j}.png", png)
    ds = data.load_dataset("omniglot", tmp_path)

    def names(s):
        return [ds.class_names[c] for c in ds.splits[s].classes]

    assert names("train") == ["Tifinagh/character01", "Tifinagh/character02"]
    assert names("val") == ["Latin/character01", "Latin/character02"]
    assert names("test") == ["Korean/character01"]
    img = ds.splits["test"].images[0, 0].float()
    assert img.max() > 200 and img.median() == 0  # the stroke is bright after inversion, the page dark


def test_corrupt_omniglot_zip_error_names_the_path(tmp_path):
    bad = tmp_path / "images_background.zip"
    bad.write_bytes(b"this is not a zip")
    with pytest.raises(data.DataError, match="images_background.zip is not a readable zip"):
        data.load_dataset("omniglot", tmp_path)


def test_omniglot_zip_without_pngs_is_a_layout_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as z:
        z.writestr("images_background/readme.txt", "no characters here")
    with pytest.raises(data.DataError, match="holds no <alphabet>/<character>/\\*.png"):
        data.load_dataset("omniglot", tmp_path)


# ----------------------------------------------------------------------------------------------
# folder: the user's own images in DIR/{train,val,test}/<class>/
# ----------------------------------------------------------------------------------------------
def write_image(path, width, height, colour=False, value=None, seed=0):
    """A PNG or JPEG (by suffix) of random pixels, or of one `value`; grey ("L") unless `colour`."""
    shape = (height, width, 3) if colour else (height, width)
    pixels = (np.full(shape, value, dtype=np.uint8) if value is not None
              else np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def folder_set(root, classes, width=20, height=20, colour=False):
    """DIR/<split>/<class>/ with `classes[split][class]` images each, alternately PNG and JPEG."""
    seed = 0
    for split, per_class in classes.items():
        for c, n in per_class.items():
            for i in range(n):
                write_image(root / split / c / f"{i}.{'png' if i % 2 == 0 else 'jpg'}", width, height, colour,
                            seed=seed)
                seed += 1
    return root


SMALL_FOLDER = {"train": {"b_dog": 3, "a_cat": 2}, "val": {"c_owl": 2}, "test": {"e_fox": 2, "d_eel": 1}}


def test_folder_classes_are_the_folder_names_sorted_train_then_val_then_test(tmp_path):
    ds = data.load_dataset("folder", folder_set(tmp_path / "set", SMALL_FOLDER))
    assert ds.class_names == ["a_cat", "b_dog", "c_owl", "d_eel", "e_fox"]
    assert [ds.splits[s].classes for s in ("train", "val", "test")] == [[0, 1], [2], [3, 4]]
    assert ds.splits["train"].labels.tolist() == [0, 0, 1, 1, 1]  # files of a class in name order
    assert ds.splits["test"].labels.tolist() == [3, 4, 4]
    assert ds.name.startswith("folder-") and (ds.image_size, ds.channels) == (20, 1)
    first = data.read_image(tmp_path / "set" / "train" / "a_cat" / "0.png", 20, 1)
    assert torch.equal(ds.splits["train"].images[0], first)
    train = ds.splits["train"].images.double() / 255  # mean/std of the train split, by the definition
    assert ds.mean == pytest.approx([train.mean().item()])
    assert ds.std == pytest.approx([train.std(unbiased=False).item()])


def test_folder_image_size_is_the_median_of_each_images_mean_side(tmp_path):
    """Sizes 10x30, 20x20, 40x10: mean sides 20, 20, 25 -> median 20 (the longer side would give 30)."""
    root = tmp_path / "set"
    write_image(root / "train" / "a" / "0.png", 10, 30)
    write_image(root / "val" / "b" / "0.jpg", 20, 20)
    write_image(root / "test" / "c" / "0.png", 40, 10)
    ds = data.load_dataset("folder", root)
    assert ds.image_size == 20 and ds.splits["val"].images.shape == (1, 1, 20, 20)
    # then rounded half up to a multiple of 4 (the meta-generator's s/4, supplement Table 1)
    assert data.median_side([(20, 20), (21, 21)]) == 20  # median 20.5 -> 20
    assert data.median_side([(21, 22), (22, 22), (30, 30)]) == 24  # median 22 -> 22 / 4 = 5.5 -> 6 -> 24
    assert data.median_side([(9, 10), (28, 28), (28, 29)]) == 28  # median 28, not the mean side 21.7


def test_folder_of_grey_images_has_one_channel_and_one_colour_image_makes_three(tmp_path):
    root = tmp_path / "set"
    write_image(root / "train" / "a" / "0.png", 16, 16, value=100)
    write_image(root / "val" / "b" / "0.jpg", 16, 16)
    Image.fromarray(np.zeros((16, 16), dtype=bool)).save(root / "val" / "b" / "1.png")  # a 1-bit PNG is grey too
    write_image(root / "test" / "c" / "0.png", 16, 16)
    assert data.load_dataset("folder", root).channels == 1
    write_image(root / "test" / "c" / "1.jpg", 16, 16, colour=True)
    ds = data.load_dataset("folder", root)
    assert ds.channels == 3 and ds.splits["train"].images.shape == (1, 3, 16, 16)
    assert (ds.splits["train"].images == 100).all()  # a grey image in a colour set: three equal channels
    assert len(ds.mean) == 3


def test_folder_images_are_resized_to_the_given_size_as_pillow_bilinear(tmp_path):
    root = folder_set(tmp_path / "set", SMALL_FOLDER, width=30, height=18, colour=True)
    ds = data.load_dataset("folder", root, image_size=12)
    assert ds.image_size == 12 and ds.splits["train"].images.shape == (5, 3, 12, 12)
    path = root / "train" / "a_cat" / "0.png"
    expected = np.asarray(Image.open(path).convert("RGB").resize((12, 12), Image.Resampling.BILINEAR))
    assert torch.equal(ds.splits["train"].images[0], torch.from_numpy(expected.copy()).permute(2, 0, 1))
    grey = write_image(tmp_path / "flat.png", 40, 24, value=77)
    assert (data.read_image(grey, 9, 1) == 77).all() and data.read_image(grey, 9, 3).shape == (3, 9, 9)
    deep = tmp_path / "deep.png"  # 16-bit grey keeps its top 8 bits (Pillow's convert("L") would clip to 255)
    Image.fromarray(np.full((8, 8), 0x8000, dtype=np.uint16)).save(deep)
    assert (data.read_image(deep, 8, 1) == 0x80).all()


def test_folder_cache_is_reused_and_rebuilt_when_an_image_is_added(tmp_path, monkeypatch):
    root = folder_set(tmp_path / "set", SMALL_FOLDER)
    first = data.load_dataset("folder", root)
    assert [p.name for p in root.glob(".free_cache_*.npz")] == [".free_cache_20_1.npz"]

    def no_decoding(*args):
        raise AssertionError("decoded although the cache is up to date")

    monkeypatch.setattr(data, "read_image", no_decoding)
    again = data.load_dataset("folder", root)
    assert torch.equal(again.splits["val"].images, first.splits["val"].images)
    assert again.class_names == first.class_names and again.name == first.name
    write_image(root / "val" / "c_owl" / "9.png", 20, 20)
    with pytest.raises(AssertionError, match="decoded"):  # the layout changed: the cache is rebuilt
        data.load_dataset("folder", root)
    monkeypatch.undo()
    grown = data.load_dataset("folder", root)
    assert len(grown.splits["val"].labels) == 3 and grown.name != first.name


def test_folder_without_train_split_when_not_needed_takes_mean_std_from_val(tmp_path):
    root = folder_set(tmp_path / "set", {s: SMALL_FOLDER[s] for s in ("val", "test")}, colour=True)
    with pytest.raises(data.DataError, match="no train/ folder"):
        data.load_dataset("folder", root)
    ds = data.load_dataset("folder", root, need_train=False)
    assert ds.splits["train"].images.shape == (0, 3, 20, 20) and ds.splits["train"].classes == []
    assert ds.class_names == ["c_owl", "d_eel", "e_fox"]
    val = ds.splits["val"].images.double() / 255
    assert ds.mean == pytest.approx(val.mean(dim=(0, 2, 3)).tolist())


def truncated_png(path):
    write_image(path, 20, 20)
    path.write_bytes(path.read_bytes()[:60])  # the header survives, the pixels do not


BAD_FOLDERS = {  # case -> (how to spoil SMALL_FOLDER, the words the error must hold)
    "missing folder": (lambda r: shutil.rmtree(r), "no such folder"),
    "missing split": (lambda r: shutil.rmtree(r / "val"), "no val/ folder"),
    "split without classes": (lambda r: [shutil.rmtree(c) for c in (r / "test").iterdir()], "holds no class folders"),
    "loose images": (lambda r: write_image(r / "train" / "x.png", 8, 8), "beside its class folders"),
    "empty class": (lambda r: (r / "val" / "z_empty").mkdir(), "z_empty of the val split holds no images"),
    "not an image": (lambda r: (r / "train" / "a_cat" / "7.png").write_bytes(b"not a png"),
                     "cannot read image .*a_cat/7.png"),
    "truncated image": (lambda r: truncated_png(r / "test" / "d_eel" / "5.png"), "cannot read image .*d_eel/5.png"),
    "shared class name": (lambda r: write_image(r / "test" / "a_cat" / "0.png", 8, 8),
                          "'a_cat' is in both train/ and test/"),
    "damaged cache": (lambda r: (data.load_dataset("folder", r), (r / ".free_cache_20_1.npz").write_bytes(b"x")),
                      "image cache .*free_cache_20_1.npz is unreadable"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_folder_bad_layout_is_a_data_error_saying_what_is_wrong(tmp_path, case):
    root = folder_set(tmp_path / "set", SMALL_FOLDER)
    spoil, words = BAD_FOLDERS[case]
    spoil(root)
    with pytest.raises(data.DataError, match=words):
        data.load_dataset("folder", root)


# ----------------------------------------------------------------------------------------------
# Synthetic data and task sampling
# ----------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_given_seed_and_sized_on_request():
    a = data.load_dataset("synthetic", None, seed=3)
    b = data.load_dataset("synthetic", None, seed=3)
    assert torch.equal(a.splits["train"].images, b.splits["train"].images)
    c = data.load_dataset("synthetic", None, seed=4)
    assert not torch.equal(a.splits["train"].images, c.splits["train"].images)
    assert [len(a.splits[s].classes) for s in ("train", "val", "test")] == [40, 10, 10]
    assert a.splits["train"].images.shape == (40 * 60, 3, 32, 32)
    d = data.load_dataset("synthetic", None, image_size=28)
    assert d.image_size == 28 and d.splits["test"].images.shape[-2:] == (28, 28)
    g = torch.Generator().manual_seed(0)  # 84x84 rendered directly (a full set takes seconds)
    assert data.render_class(data.class_pattern(g), 4, 84, g).shape == (4, 3, 84, 84)


def labelled_split(n_classes=8, per_class=20):
    """A split whose every pixel holds the global class id, so tasks can be traced back."""
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    images = labels.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return data.make_split(images, labels)


def test_sample_tasks_shapes_and_relative_labels():
    split = labelled_split()
    g = torch.Generator().manual_seed(0)
    x_s, y_s, x_q, y_q = data.sample_tasks(split, 6, 5, 2, 3, g)
    assert x_s.shape == (6, 10, 1, 4, 4) and x_q.shape == (6, 15, 1, 4, 4)
    assert x_s.dtype == torch.float32 and 0 <= x_s.min() and x_s.max() <= 1
    assert y_s.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]] * 6
    assert y_q.shape == (6, 15) and set(y_q.unique().tolist()) == set(range(5))
    for t in range(6):  # one global class per relative label, the same in support and query
        gs, gq = (x_s[t, :, 0, 0, 0] * 255).round(), (x_q[t, :, 0, 0, 0] * 255).round()
        cls = [gs[y_s[t] == k].unique() for k in range(5)]
        assert all(len(c) == 1 for c in cls) and len({c.item() for c in cls}) == 5
        assert all(gq[y_q[t] == k].eq(cls[k]).all() for k in range(5))


def test_sample_tasks_is_seeded_by_the_generator_only():
    split = labelled_split()
    run = [data.sample_tasks(split, 3, 5, 1, 2, torch.Generator().manual_seed(s))
           for s in (7, 7, 8)]
    assert all(torch.equal(a, b) for a, b in zip(run[0], run[1]))
    assert not torch.equal(run[0][0], run[2][0])


def test_sample_tasks_uses_only_the_given_classes():
    split = labelled_split()
    x_s, _, x_q, _ = data.sample_tasks(split, 10, 3, 1, 2, torch.Generator().manual_seed(0),
                                       classes=[1, 4, 6])
    seen = set((torch.cat([x_s, x_q], 1) * 255).round().unique().tolist())
    assert seen == {1.0, 4.0, 6.0}


def test_sample_tasks_support_and_query_images_are_disjoint():
    """Every image is unique (its index in two pixels); no support image of a task reappears as a query."""
    labels = torch.arange(8).repeat_interleave(20)
    idx = torch.arange(160)
    images = torch.stack([idx // 16, idx % 16], 1).to(torch.uint8).view(160, 1, 1, 2)
    x_s, _, x_q, _ = data.sample_tasks(data.make_split(images, labels), 30, 5, 5, 15,
                                       torch.Generator().manual_seed(0))
    for s_, q_ in zip(x_s, x_q):
        ids_s, ids_q = {tuple(v.tolist()) for v in s_.flatten(1)}, {tuple(v.tolist()) for v in q_.flatten(1)}
        assert len(ids_s) == 25 and len(ids_q) == 75 and not ids_s & ids_q


# ----------------------------------------------------------------------------------------------
# The teacher zoo
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic28():
    return data.load_dataset("synthetic", None, image_size=28)


@pytest.fixture(scope="module")
def built_zoo(synthetic28, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    lines = []
    teachers = zoo.build_zoo(synthetic28, "conv4", 3, 5, 0, "tiny", TINY_ZOO, root, "cpu",
                             log=lines.append)
    return root, teachers, lines


def zoo_folder(root):
    return zoo.zoo_dir(root, "synthetic", "conv4", 3, 5, 0, "tiny")


def test_zoo_teachers_beat_chance_and_manifest_is_written(built_zoo, synthetic28):
    root, teachers, lines = built_zoo
    train_classes = set(synthetic28.splits["train"].classes)
    for i, t in enumerate(teachers):
        assert t.index == i and t.arch == "conv4" and not t.model.training
        assert len(t.classes) == 5 and set(t.classes) <= train_classes
        assert t.acc > 0.5  # chance is 0.2
    manifest = json.loads((zoo_folder(root) / zoo.MANIFEST).read_text())
    assert [e["classes"] for e in manifest["teachers"]] == [t.classes for t in teachers]
    assert [e["acc"] for e in manifest["teachers"]] == [t.acc for t in teachers]
    ckpt = torch.load(zoo_folder(root) / "teacher_000.pt", weights_only=True)
    assert {"state_dict", "arch", "arch_kwargs", "classes", "acc"} <= set(ckpt)
    assert len(lines) == 4 and "mean held-out acc" in lines[-1]


def test_zoo_teacher_acc_is_its_accuracy_on_its_held_out_images(built_zoo, synthetic28):
    _, teachers, _ = built_zoo
    t = teachers[1]
    rng = zoo.teacher_rng(0, 1)
    assert zoo.draw_classes(synthetic28, 5, rng, 1) == t.classes
    _, _, x_held, y_held = zoo.teacher_data(synthetic28.splits["train"], t.classes, 0.8, rng)
    assert len(x_held) == 5 * 12  # 20% of 60 images per class
    assert zoo.evaluate(t.model, x_held, y_held, torch.device("cpu")) == t.acc


def test_zoo_rerun_reuses_cache_without_training(built_zoo, synthetic28, monkeypatch):
    root, teachers, _ = built_zoo

    def no_training(*args, **kwargs):
        raise AssertionError("trained a teacher that was cached")

    monkeypatch.setattr(zoo, "train_teacher", no_training)
    lines = []
    again = zoo.build_zoo(synthetic28, "conv4", 3, 5, 0, "tiny", TINY_ZOO, root, "cpu",
                          log=lines.append)
    assert all("cached" in line for line in lines[:3])
    for a, b in zip(teachers, again):
        assert a.classes == b.classes and a.acc == b.acc
        assert all(torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())


def test_zoo_resumes_after_interruption_training_only_the_missing_teacher(built_zoo, synthetic28,
                                                                         tmp_path, monkeypatch):
    root = tmp_path / "cache"
    shutil.copytree(built_zoo[0], root)
    folder = zoo_folder(root)
    (folder / "teacher_001.pt").unlink()
    manifest = json.loads((folder / zoo.MANIFEST).read_text())
    manifest["teachers"] = [e for e in manifest["teachers"] if e["index"] != 1]
    (folder / zoo.MANIFEST).write_text(json.dumps(manifest))
    trained = []
    real = zoo.train_teacher

    def counting(*args, **kwargs):
        trained.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(zoo, "train_teacher", counting)
    teachers = zoo.build_zoo(synthetic28, "conv4", 3, 5, 0, "tiny", TINY_ZOO, root, "cpu")
    assert len(trained) == 1 and (folder / "teacher_001.pt").is_file()
    assert teachers[1].classes == built_zoo[1][1].classes
    assert len(json.loads((folder / zoo.MANIFEST).read_text())["teachers"]) == 3


def test_zoo_cache_built_with_other_settings_is_refused(built_zoo, synthetic28):
    other = zoo.ZooSettings(epochs=4, batch_size=32)
    with pytest.raises(data.UserError, match="use another preset name or delete that folder"):
        zoo.build_zoo(synthetic28, "conv4", 3, 5, 0, "tiny", other, built_zoo[0], "cpu")


def test_zoo_damaged_teacher_file_is_trained_again_with_one_line_naming_it(built_zoo, synthetic28, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(built_zoo[0], root)
    damaged = zoo_folder(root) / "teacher_002.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a truncated file, as an interrupted copy leaves it
    lines = []
    teachers = zoo.build_zoo(synthetic28, "conv4", 3, 5, 0, "tiny", TINY_ZOO, root, "cpu", log=lines.append)
    assert [line for line in lines if "unreadable" in line] == \
        [f"teacher file {damaged} is unreadable (RuntimeError); retraining it"]
    assert len(teachers) == 3 and "1/1 to train" in [line for line in lines if line.startswith("teacher   3/3")][0]
    torch.load(damaged, weights_only=True)  # whole again


def test_best_epoch_weights_are_a_real_copy_not_the_last_epoch(synthetic28, monkeypatch):
    """Scripted held-out accuracies 0.5, 0.9, 0.3: the result must be epoch 2's weights."""
    scripted, seen = iter([0.5, 0.9, 0.3]), []

    def fake_evaluate(model, x, y, device):
        seen.append(copy.deepcopy(model.state_dict()))
        return next(scripted)

    monkeypatch.setattr(zoo, "evaluate", fake_evaluate)
    rng = zoo.teacher_rng(0, 0)
    classes = zoo.draw_classes(synthetic28, 5, rng, 0)
    batch = zoo.teacher_data(synthetic28.splits["train"], classes, 0.8, rng)
    model = zoo.new_teacher_model(synthetic28, "conv4", 5)
    settings = zoo.ZooSettings(epochs=3, batch_size=32)
    state, acc, epoch = zoo.train_teacher(model, "conv4", batch, settings, False,
                                          torch.Generator().manual_seed(0), torch.device("cpu"))
    assert (acc, epoch) == (0.9, 2)
    assert all(torch.equal(state[k], v) for k, v in seen[1].items())
    assert not all(torch.equal(state[k], v) for k, v in seen[2].items())


def test_mix_zoo_draws_each_teacher_from_one_domain_and_cycles_archs(synthetic28):
    domains = [data.MIX_DOMAINS[c % 3] for c in range(len(synthetic28.class_names))]
    mix = data.FewShotDataset("mix", 28, 3, synthetic28.mean, synthetic28.std,
                              synthetic28.class_names, domains, synthetic28.splits)
    for i in range(6):
        classes = zoo.draw_classes(mix, 5, zoo.teacher_rng(0, i), i)
        assert {domains[c] for c in classes} == {zoo.MIX_DOMAINS[i % 3]}
    assert [zoo.teacher_arch("mix", i) for i in range(4)] == ["conv4", "resnet10", "resnet18",
                                                             "conv4"]
