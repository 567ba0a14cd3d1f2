"""The family matrix: every decoder-only family we claim, from a tiny random config (no weights).

Per family: the driver replays every block exactly as the model runs it (its own mask and rotary
table for sliding-window and full-attention blocks); SparseGPT, Wanda and SDS at 2:4 leave every
block linear with 2 of every 4 inputs (fused q/k/v and gate/up projections and GPT-2's Conv1D
included) and every other parameter (embeddings, norms, biases, LM head) bit-identical; one method
at 50% (each method in turn over the families) leaves half of every linear, and that model saved
with sdsx reloads in plain transformers with the same logits. Mixture-of-experts families are
refused with one line naming the model type; a layout sdsx does not know is refused with the paths
it tried and how to point it at the blocks, and then pruned.
"""

from __future__ import annotations

import pytest
import torch

import sdsx
from sdsx.model.blocks import find_blocks, find_linears, get_weight
from sdsx.model.driver import BlockDriver

VOCAB = 128
SEQLEN = 16
ATTN = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# sliding-window blocks see 8 tokens, so their mask differs from the full-attention blocks'
SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])


def _config(family: str):
    import transformers as tf

    base = dict(vocab_size=VOCAB, num_hidden_layers=2)
    builders = {
        "llama": lambda: tf.LlamaConfig(**base, **ATTN),
        "mistral": lambda: tf.MistralConfig(**base, **ATTN, sliding_window=8),
        "qwen2": lambda: tf.Qwen2Config(**base, **ATTN),
        "qwen3": lambda: tf.Qwen3Config(**base, **ATTN, head_dim=8),  # q/k norms
        "gemma2": lambda: tf.Gemma2Config(**base, **ATTN, head_dim=8, **SLIDING),
        "gemma3": lambda: tf.Gemma3TextConfig(**base, **ATTN, head_dim=8, **SLIDING),  # q/k norms, local rotary table
        "phi3": lambda: tf.Phi3Config(**base, **ATTN, pad_token_id=0),  # fused qkv_proj and gate_up_proj
        "gpt_neox": lambda: tf.GPTNeoXConfig(**base, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                             max_position_embeddings=64),  # fused query_key_value
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_positions=64),  # Conv1D
        "opt": lambda: tf.OPTConfig(**base, hidden_size=32, ffn_dim=64, num_attention_heads=4, max_position_embeddings=64,
                                    word_embed_proj_dim=32),
        "falcon": lambda: tf.FalconConfig(**base, hidden_size=32, num_attention_heads=4),  # fused, parallel attention
        "stablelm": lambda: tf.StableLmConfig(**base, **ATTN),
        "olmo": lambda: tf.OlmoConfig(**base, **ATTN, pad_token_id=0),  # norms without parameters
        "olmo2": lambda: tf.Olmo2Config(**base, **ATTN, pad_token_id=0),
        "mixtral": lambda: tf.MixtralConfig(**base, **ATTN, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**base, **ATTN, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                               num_experts=4, num_experts_per_tok=2),
        "olmoe": lambda: tf.OlmoeConfig(**base, **ATTN, num_experts=4, num_experts_per_tok=2, pad_token_id=0),
    }
    return builders[family]()


DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_neox", "gpt2", "opt", "falcon",
                  "stablelm", "olmo", "olmo2")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "olmoe")
METHODS = ("sparsegpt", "wanda", "sds")


def build(family: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32).eval()


def calib(nsamples: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (nsamples, SEQLEN), generator=torch.Generator().manual_seed(0))


def run(model: torch.nn.Module, method: str, sparsity: str | float):
    if method == "sds":
        return sdsx.sds_prune(model, calib(), sparsity, "sparsegpt", dense_iters=5, adjust_iters=5, progress=False)
    return sdsx.prune(model, calib(), method, sparsity, progress=False)


def block_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every block linear's (out, in) weight, by its parameter name."""
    blocks, path = find_blocks(model)
    out = {}
    for index, block in enumerate(blocks):
        for name, module in find_linears(block, prefix=f"{path}.{index}").items():
            out[f"{name}.weight"] = get_weight(module)
    return out


def assert_only_block_linears_changed(model: torch.nn.Module, dense: dict[str, torch.Tensor]) -> None:
    linears = block_weights(model)
    for name, value in model.state_dict().items():
        if name not in linears:
            assert torch.equal(value, dense[name]), f"{name} changed: embeddings, norms, biases and the head are never pruned"


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_driver_replays_every_block_as_the_model_runs_it(family):
    model = build(family)
    ids = calib(2)
    seen: list[torch.Tensor] = []
    blocks, _ = find_blocks(model)
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)) for b in blocks]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        for h in hooks:
            h.remove()
        driver = BlockDriver(model, device="cpu", progress=False)
        inputs, arguments = driver.capture([ids])
        x = inputs[0]
        for index, block in enumerate(blocks):
            x = driver._call(block, x, arguments)
            torch.testing.assert_close(x, seen[index], rtol=0, atol=1e-6, msg=f"block {index}")


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_methods_patterns_and_reload(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build(family)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    for method in METHODS:
        model.load_state_dict(dense)
        report = run(model, method, "2:4")
        weights = block_weights(model)
        assert len(report.layers) == len(weights), method
        for name, W in weights.items():
            kept = (W.reshape(W.shape[0], -1, 4) != 0).sum(-1)
            assert int(kept.max()) <= 2, f"{method}: {name} {tuple(W.shape)} breaks 2:4 along its inputs"
        assert_only_block_linears_changed(model, dense)

    method = METHODS[DENSE_FAMILIES.index(family) % len(METHODS)]  # each method at 50% on a third of the families
    model.load_state_dict(dense)
    report = run(model, method, 0.5)
    for name, W in block_weights(model).items():
        assert abs(float((W == 0).float().mean()) - 0.5) <= 0.02, f"{method} 50%: {name}"
    assert_only_block_linears_changed(model, dense)
    sdsx.save_pruned(model, None, tmp_path / "m", report=report)
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    ids = calib(2)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    sdsx.load(tmp_path / "m")  # the stored pattern still holds


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_mixture_of_experts_is_refused_in_one_line(family):
    model = build(family)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    name = type(model).__name__
    for call in (lambda: sdsx.prune(model, calib(), "sparsegpt", "2:4", progress=False),
                 lambda: sdsx.sds_prune(model, calib(), "2:4", progress=False)):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and name in message and model.config.model_type in message
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())  # nothing touched


class Wrapped(torch.nn.Module):
    """A causal LM whose blocks sit where sdsx does not look (backbone.model.layers)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = inner

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.backbone(input_ids=input_ids, **kwargs)


def test_unknown_layout_names_the_paths_tried_and_the_fix():
    model = Wrapped(build("llama"))
    with pytest.raises(ValueError) as info:
        sdsx.prune(model, calib(), "wanda", "2:4", progress=False)
    message = str(info.value)
    assert "\n" not in message and "model.model.layers" in message and "model.transformer.h" in message  # where it looked
    assert 'blocks="backbone.model.layers"' in message  # the fix, with the path it saw
    with pytest.raises(ValueError, match=r'blocks="backbone.nope" finds nothing in Wrapped.*backbone.model.layers'):
        sdsx.prune(model, calib(), "wanda", "2:4", progress=False, blocks="backbone.nope")
    report = sdsx.prune(model, calib(), "wanda", "2:4", progress=False, blocks="backbone.model.layers")
    assert len(report.layers) == 14 and all(abs(r.sparsity - 0.5) < 1e-9 for r in report.layers)
    assert sdsx.model.blocks.find_blocks(model).path == "backbone.model.layers"  # kept on the model for later calls
