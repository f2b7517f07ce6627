"""The bundled tiny Qwen3 (``drift/data/tiny_qwen3/``, made by ``scripts/train_tiny_qwen3.py``).

It must resolve offline under its bundled names, be the architecture it claims (Qwen3: GQA,
q/k-norm), have learned something (held-out loss well below a byte-bigram baseline), and be
what the script produces: the first pre-training steps are re-run here and compared with the
committed ``step20``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import drift
from drift import checkpoint
from drift.checkpoint import TINY_QWEN3, TINY_QWEN3_DIR, Checkpoint, resolve_model
from drift.cli import main as cli_main
from drift.errors import ModelNotFoundError

ROOT = Path(__file__).resolve().parent.parent
RECORD = json.loads((TINY_QWEN3_DIR / "training.json").read_text())
SAVED = RECORD["pretrain"]["saved"]  # folder name -> step
VARIANTS = {f"{TINY_QWEN3}@{n}": n for n in SAVED if n != "final"} | {
    TINY_QWEN3: "final", f"{TINY_QWEN3}@final": "final", f"{TINY_QWEN3}@finetune-stdlib": "finetune_stdlib"}
REPRO_STEP = 20


@pytest.fixture(scope="module")
def script():
    """``scripts/train_tiny_qwen3.py`` imported as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("train_tiny_qwen3", ROOT / "scripts" / "train_tiny_qwen3.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _same_corpus(script) -> None:
    """Skip unless this Python's pydoc_data is the one the committed run trained on."""
    *_, docs = script.docs_corpus()
    if docs["sha256"] != RECORD["pretrain"]["corpus"]["sha256"]:
        pytest.skip(f"pydoc_data of Python {RECORD['environment']['python']} was the corpus; this "
                    f"Python's differs, so the committed weights cannot be reproduced here")


def test_bundled_names_resolve_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert set(SAVED) >= {"step0", f"step{REPRO_STEP}", "final"} and len(SAVED) >= 5
    for name, folder in VARIANTS.items():
        assert resolve_model(name) == TINY_QWEN3_DIR / folder, name
    # Every saved folder is an ordinary HF folder, with the byte tokenizer.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(TINY_QWEN3), local_files_only=True)
    text = "def f(x):\n\treturn x  # héllo ✓"
    assert tok(text).input_ids == list(text.encode("utf-8"))
    assert tok.decode(tok(text).input_ids) == text
    assert (tok.eos_token_id, tok.pad_token_id) == (256, 257)


def test_config_is_qwen3_with_gqa_and_qk_norm():
    ck = Checkpoint.open(TINY_QWEN3)
    cfg = ck.config
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert cfg["num_attention_heads"] // cfg["num_key_value_heads"] >= 2
    assert cfg["num_hidden_layers"] == 6 and cfg["hidden_size"] == 128
    d_head = cfg["head_dim"]
    for i in range(cfg["num_hidden_layers"]):
        for norm in ("q_norm", "k_norm"):
            assert ck.get(f"model.layers.{i}.self_attn.{norm}.weight").shape == (d_head,)
        assert ck.get(f"model.layers.{i}.self_attn.k_proj.weight").shape == (
            cfg["num_key_value_heads"] * d_head, cfg["hidden_size"])
    ck.close()


def test_analyze_runs():
    res = drift.analyze(TINY_QWEN3, layers=[0, 2, 5], n_null=1, progress=False)
    assert res.meta["architecture"] == "qwen3"
    assert res.meta["config"]["qk_norm"] and res.meta["config"]["n_kv_heads"] == 2
    assert {"q_norm", "k_norm", "q_proj"} <= set(res.df["family"])
    assert set(zip(res.df.layer_a, res.df.layer_b)) == {(0, 2), (2, 5)}
    assert res.df[["residual", "null"]].notna().all().all()


def test_trained_beats_bigram_baseline():
    pre = RECORD["pretrain"]
    assert pre["heldout_loss"]["final"] == pre["final_heldout_loss"]
    assert pre["final_heldout_loss"] < pre["bigram_heldout_loss"] - 0.3  # nats/byte
    assert abs(pre["heldout_loss"]["step0"] - math.log(258)) < 0.5  # the init knows nothing
    losses = [pre["heldout_loss"][n] for n in sorted(SAVED, key=SAVED.get)]
    assert losses == sorted(losses, reverse=True)  # held-out loss falls at every saved step
    ft = RECORD["finetune"]
    assert ft["heldout_loss_after"]["stdlib"] < ft["heldout_loss_before"]["stdlib"] - 0.1


def test_committed_final_scores_what_training_json_says(script):
    """The recorded held-out loss (of the float32 model) holds for the committed bf16 weights."""
    _same_corpus(script)
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(TINY_QWEN3_DIR / "final", dtype=torch.float32,
                                             local_files_only=True)
    _, heldout, _ = script.docs_corpus()
    assert script.heldout_loss(model, heldout) == pytest.approx(RECORD["pretrain"]["final_heldout_loss"],
                                                                abs=0.01)


def test_first_steps_reproduce_committed_checkpoint(script):
    """Re-run pre-training's first REPRO_STEP updates from the seed: the committed bf16 step20
    must be the rounding of what comes out (|x - bf16(x)| <= 2^-8 |x|, plus 1e-5 of slack)."""
    _same_corpus(script)
    rerun = script.pretrain_first(REPRO_STEP).state_dict()
    stored = load_file(TINY_QWEN3_DIR / f"step{REPRO_STEP}" / "model.safetensors")
    init = load_file(TINY_QWEN3_DIR / "step0" / "model.safetensors")
    assert stored and set(stored) <= set(rerun)
    for name, s in stored.items():
        s = s.float()
        bound = 2.0 ** -8 * s.abs() + 1e-5
        assert ((rerun[name] - s).abs() <= bound).all(), name
    # The check has teeth: the initialisation is far outside the same bound.
    moved = [((init[n].float() - stored[n].float()).abs() > 2.0 ** -8 * stored[n].float().abs() + 1e-5)
             .float().mean().item() for n in stored if stored[n].dim() == 2]
    assert min(moved) > 0.5


@pytest.mark.parametrize("name", [f"{TINY_QWEN3}@step7", f"{TINY_QWEN3}@", f"{TINY_QWEN3}@base"])
def test_unknown_variant_is_one_line_listing_the_steps(name):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(name)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{name}: no such variant")
    assert all(f"{TINY_QWEN3}@{n}" in msg for n in SAVED if n != "final")
    assert f"{TINY_QWEN3}@finetune-stdlib" in msg


def test_unknown_variant_from_the_cli(capsys):
    assert cli_main(["analyze", "--model", f"{TINY_QWEN3}@step7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"drift: {TINY_QWEN3}@step7: no such variant")


def test_missing_bundle_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "TINY_QWEN3_DIR", tmp_path / "absent")
    with pytest.raises(ModelNotFoundError, match=r"missing from this installation"):
        resolve_model(TINY_QWEN3)


def test_near_miss_names_the_bundled_models():
    with pytest.raises(ModelNotFoundError, match=r"not a bundled name: minilm, tiny-qwen3"):
        resolve_model("tiny-qwen")
