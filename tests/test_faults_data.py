"""Fault injection into the decoded-image cache: each kind of damage is detected, warned about and rebuilt.

The rebuilt evaluation set must equal a fresh decode (images, labels, data_id), and the rebuilt entry must be
used as it is by the next run.
"""

import errno
import json

import numpy as np
import pytest

from layercrit.data import folders

from .test_data import make_image_folder
from .test_reliability_data import folder_evalset, same_evalset


def flip_last_byte(name):
    def damage(entry):
        content = bytearray((entry / name).read_bytes())
        content[-1] ^= 0xFF
        (entry / name).write_bytes(bytes(content))
        np.load(entry / name)  # the header is intact: only the checksum can tell
    return damage


def truncate(name, keep):
    def damage(entry):
        content = (entry / name).read_bytes()
        (entry / name).write_bytes(content[:int(len(content) * keep)])
    return damage


def delete(name):
    def damage(entry):
        (entry / name).unlink()
    return damage


def write(name, text):
    def damage(entry):
        (entry / name).write_text(text)
    return damage


def edit_meta(change):
    def damage(entry):
        meta = json.loads((entry / "meta.json").read_text())
        change(meta)
        (entry / "meta.json").write_text(json.dumps(meta))
    return damage


DAMAGE = {
    "pixel byte flipped, header intact": flip_last_byte("images.npy"),
    "label byte flipped, header intact": flip_last_byte("labels.npy"),
    "images.npy truncated": truncate("images.npy", keep=0.5),
    "images.npy empty": truncate("images.npy", keep=0),
    "images.npy header garbage": write("images.npy", "garbage" * 100),
    "images.npy deleted": delete("images.npy"),
    "labels.npy deleted": delete("labels.npy"),
    "meta.json garbage": write("meta.json", "{garbage"),
    "meta.json not an object": write("meta.json", "[1, 2]"),
    "meta.json deleted": delete("meta.json"),
    "checksum missing (old-format meta.json)": edit_meta(lambda meta: meta.pop("checksum")),
    "checksum of other data": edit_meta(lambda meta: meta.update(checksum="0" * 64)),
    "n_skipped missing": edit_meta(lambda meta: meta.pop("n_skipped")),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_cache_entry_is_detected_rebuilt_and_reused(tmp_path, monkeypatch, caplog, damage):
    folder = make_image_folder(tmp_path / "val", n_per_class=3, size=(16, 16))
    cache = tmp_path / "cache"
    fresh = folder_evalset(folder)
    folder_evalset(folder, cache_dir=cache)
    [entry] = (cache / "evalsets").iterdir()
    damage(entry)

    rebuilt = folder_evalset(folder, cache_dir=cache)
    assert same_evalset(rebuilt, fresh)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"cannot use the cached images in {entry} (") and warning.endswith("decoding them again")

    caplog.clear()
    monkeypatch.setattr(folders, "_decode_all", lambda *a, **k: pytest.fail("the rebuilt entry was not used"))
    assert same_evalset(folder_evalset(folder, cache_dir=cache), fresh)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert [path.name for path in (cache / "evalsets").iterdir()] == [entry.name]  # nothing left aside


def test_damaged_entry_in_a_read_only_cache_is_decoded_without_it(tmp_path, monkeypatch, caplog):
    folder = make_image_folder(tmp_path / "val", n_per_class=2, size=(16, 16))
    cache = tmp_path / "cache"
    fresh = folder_evalset(folder)
    folder_evalset(folder, cache_dir=cache)
    [entry] = (cache / "evalsets").iterdir()
    flip_last_byte("images.npy")(entry)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(folders, "_unwritable_caches", set())
    monkeypatch.setattr("tempfile.mkdtemp", read_only)
    assert same_evalset(folder_evalset(folder, cache_dir=cache), fresh)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w.split(" (")[0] for w in warnings] == [f"cannot use the cached images in {entry}",
                                                     f"cannot write the image cache in {cache / 'evalsets'}"]


def test_entry_written_by_another_run_meanwhile_is_kept_without_a_warning(tmp_path, monkeypatch, caplog):
    folder = make_image_folder(tmp_path / "val", n_per_class=2, size=(16, 16))
    cache = tmp_path / "cache"
    first = folder_evalset(folder, cache_dir=cache)
    [entry] = (cache / "evalsets").iterdir()
    monkeypatch.setattr(folders, "_discard", lambda entry: None)  # the other run's entry lands after the discard
    folders._write_cache(entry, first.images, first.labels, first.n_skipped, first.description)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert [path.name for path in (cache / "evalsets").iterdir()] == [entry.name]
    assert same_evalset(folder_evalset(folder, cache_dir=cache), first)
