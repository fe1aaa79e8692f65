"""The connito.mask/1 record as a class: save/load round trip byte for byte, fields by attribute, another schema
and a newer version refused with the file, the schemas and the fix."""

import json

import pytest

from connito.experts import ExpertMask
from connito.experts.mask_file import MaskFile, MaskFileError, mask_record, write_mask_file

MODEL = {"fingerprint": "sha256:" + "cd" * 32, "model_type": "qwen3_moe", "num_layers": 3, "moe_layers": [1, 2],
         "num_experts": 4, "path": "/m"}  # fmt: skip
FIX = "select the experts again with `connito select` (it writes a mask file)"


def _mask() -> ExpertMask:
    return ExpertMask.from_ids([(1, 0), (2, 3)], 3, 4, [1, 2])


def test_write_load_save_round_trip_is_byte_identical(tmp_path):
    first = write_mask_file(tmp_path / "a.json", _mask(), MODEL, {"method": "list", "experts": [[1, 0], [2, 3]]})
    loaded = MaskFile.load(first)
    assert loaded.path == first and loaded.mask == _mask()
    assert loaded.model.moe_layers == (1, 2) and loaded.model.num_experts == 4 and loaded.model.path == "/m"
    assert (
        loaded.counts.selected == 2 and loaded.counts.per_layer == {"1": 1, "2": 1} and loaded.counts.parameters is None
    )
    second = loaded.save(tmp_path / "b.json")
    assert second.read_bytes() == first.read_bytes()
    assert json.loads(first.read_text()) == mask_record(_mask(), MODEL, {"method": "list", "experts": [[1, 0], [2, 3]]})
    assert '"1": [0]' in first.read_text(), "a layer's experts stay on one line"


def test_another_schema_is_refused_with_the_exact_message(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"schema": "connito.analysis/1"}))
    with pytest.raises(MaskFileError) as caught:
        MaskFile.load(path)
    assert (
        str(caught.value) == f"{path} is not a mask file: schema 'connito.analysis/1', expected 'connito.mask/1'; {FIX}"
    )


def test_a_future_version_is_refused_naming_the_upgrade(tmp_path):
    path = write_mask_file(tmp_path / "m.json", _mask(), MODEL, {})
    path.write_text(path.read_text().replace("connito.mask/1", "connito.mask/2"))
    with pytest.raises(MaskFileError) as caught:
        MaskFile.load(path)
    assert str(caught.value) == (
        f"{path} is a mask file of schema 'connito.mask/2', newer than this Connito reads ('connito.mask/1'): "
        f"upgrade Connito, or {FIX}"
    )
