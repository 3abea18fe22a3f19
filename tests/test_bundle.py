"""The artifact bundle (loraforge_core/bundle.py): symmetric write/read and pack/unpack,
content addressing, and refusal of anything that is not what it claims."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from loraforge_core import bundle as bundles
from loraforge_core.bundle import BundleError, Manifest


def manifest(step: int = 10) -> Manifest:
    return Manifest(
        base_model="tiny", method="pti", tokens=["<s1>"], rank=2,
        unet_target_modules=["to_q"], text_encoder_target_modules=[], global_step=step,
        text_hidden_size=4, cross_attention_dim=4,
    )  # fmt: skip


def weights(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    lora = {"unet.x.lora_A.weight": torch.randn(2, 4, generator=generator)}
    return lora, {"<s1>": torch.randn(4, generator=generator)}


def test_what_is_stored_reads_back_and_has_a_content_id(tmp_path: Path) -> None:
    lora, embeddings = weights()
    stored = bundles.store_bundle(tmp_path, lora, embeddings, manifest())
    assert stored.path == tmp_path / stored.id
    read = bundles.read_bundle(stored.path)
    assert read.id == stored.id and read.manifest.tokens == ["<s1>"]
    assert torch.equal(read.lora_state_dict()["unet.x.lora_A.weight"], lora["unet.x.lora_A.weight"])
    assert torch.equal(read.embeddings()["<s1>"], embeddings["<s1>"])
    # The same content is the same bundle; other content another one.
    assert bundles.store_bundle(tmp_path, lora, embeddings, manifest()).id == stored.id
    assert bundles.store_bundle(tmp_path, *weights(1), manifest()).id != stored.id


def test_a_changed_file_fails_verification(tmp_path: Path) -> None:
    stored = bundles.store_bundle(tmp_path, *weights(), manifest())
    data = bytearray((stored.path / bundles.EMBEDDINGS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (stored.path / bundles.EMBEDDINGS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        bundles.read_bundle(stored.path)


@pytest.mark.parametrize(
    ("tokens", "embeddings", "complaint"),
    [
        (["<s1>", "<s2>"], {"<s1>": torch.zeros(4)}, "are not the embeddings'"),
        (["<zz>"], {"<s1>": torch.zeros(4)}, "are not the embeddings'"),
        (["<s1>"], {"<s1>": torch.zeros(3)}, "has shape"),
        (["<s1>"], {"<s1>": torch.zeros(2, 4)}, "has shape"),
    ],
)
def test_tokens_must_be_the_embeddings_files(tmp_path, tokens, embeddings, complaint) -> None:
    lora, _ = weights()
    m = manifest()
    m.tokens = tokens
    stored = bundles.store_bundle(tmp_path, lora, embeddings, m)  # hashes are right
    with pytest.raises(BundleError, match=complaint):
        bundles.read_bundle(stored.path)


@pytest.mark.parametrize(
    ("embeddings", "complaint"),
    [
        ({"clip_l": torch.zeros(2, 4), "clip_g": torch.zeros(2, 8)}, None),  # two tokens, fine
        ({"clip_l": torch.zeros(2, 4)}, "hold \\['clip_l', 'clip_g'\\]"),
        ({"clip_l": torch.zeros(1, 4), "clip_g": torch.zeros(2, 8)}, "'clip_l' have shape"),
        ({"clip_l": torch.zeros(2, 3), "clip_g": torch.zeros(2, 8)}, "'clip_l' have shape"),
        ({"<s1>": torch.zeros(4), "<s2>": torch.zeros(4)}, "hold"),  # the SD layout
    ],
)
def test_sdxl_tokens_are_a_row_per_token_in_clip_l_and_clip_g(tmp_path, embeddings, complaint):
    m = manifest()
    m.tokens, m.family = ["<s1>", "<s2>"], "sdxl"
    stored = bundles.store_bundle(tmp_path, weights()[0], embeddings, m)
    if complaint is None:
        vectors = bundles.read_bundle(stored.path).token_vectors()
        assert [len(v) for v in vectors.values()] == [2, 2] and vectors["<s2>"][1].shape == (8,)
        return
    with pytest.raises(BundleError, match=complaint):
        bundles.read_bundle(stored.path)


def test_a_bundle_of_a_family_this_loraforge_does_not_know_is_refused() -> None:
    data = json.loads(manifest().to_json())
    data["family"] = "sd3"
    with pytest.raises(BundleError, match=r"model family 'sd3'.*upgrade loraforge"):
        Manifest.from_json(json.dumps(data))


def test_alpha_is_written_as_the_rank_and_any_other_alpha_is_refused() -> None:
    data = json.loads(manifest().to_json())
    assert data["alpha"] == 2.0  # what format-1 readers require: the weights carry alpha/rank
    assert Manifest.from_json(json.dumps(data)) == manifest()
    del data["alpha"]
    assert Manifest.from_json(json.dumps(data)) == manifest()
    data["alpha"] = 4.0  # a file whose weights want scaling by 2 is not a bundle
    with pytest.raises(BundleError, match="alpha must equal rank"):
        Manifest.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("field", "value"),
    [("format_version", "9"), ("tokens", "<s1>"), ("tokens", [1]), ("rank", True),
     ("files", {"x": 1}), ("training_config", [])],
)  # fmt: skip
def test_a_manifest_field_of_the_wrong_type_is_a_bundle_error(field, value) -> None:
    data = json.loads(manifest().to_json())
    data[field] = value
    with pytest.raises(BundleError, match=field):
        Manifest.from_json(json.dumps(data))


def test_pack_and_unpack_are_symmetric(tmp_path: Path) -> None:
    stored = bundles.store_bundle(tmp_path / "store", *weights(), manifest())
    archive = bundles.pack(stored.path)
    assert bundles.is_archive(archive) and archive == bundles.pack(stored.path)  # reproducible
    unpacked = bundles.unpack(archive, tmp_path / "copy")
    assert unpacked.id == stored.id


def archive_with(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in members:
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "names", [["../manifest.json"], ["/etc/passwd"], [*bundles.BUNDLE_FILES, "extra"]]
)
def test_an_archive_with_other_members_is_refused(tmp_path: Path, names: list[str]) -> None:
    data = archive_with([(tarfile.TarInfo(name), b"{}") for name in names])
    with pytest.raises(BundleError, match="holds exactly"):
        bundles.unpack(data, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_a_link_in_place_of_a_file_is_refused(tmp_path: Path) -> None:
    members = [(tarfile.TarInfo(name), b"{}") for name in bundles.BUNDLE_FILES[:2]]
    link = tarfile.TarInfo(bundles.MANIFEST_FILE)
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(BundleError, match="plain files"):
        bundles.unpack(archive_with([*members, (link, b"")]), tmp_path / "dest")
