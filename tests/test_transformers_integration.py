"""attn_implementation="mmfuse" in Hugging Face transformers (mmfuse.integrations.transformers).

Tiny random-init models built from configs in code (no downloads), in float32 on the CPU: the
"mmfuse" model and a copy running transformers' "sdpa" (or "eager" where sdpa refuses the
setting, e.g. Gemma 2's softcap) give the same outputs and parameter gradients, and every
attention layer runs an mmfuse op (counted below the autograd layer with a TorchDispatchMode),
never PyTorch's scaled_dot_product_attention. transformers is part of the ``test`` extra: these
tests run in CI, they are not skipped there.
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers", minversion="5.0")  # installed by the test extra (CI)

import mmfuse.integrations.transformers as mmhf  # noqa: E402  (registers "mmfuse")
from mmfuse.ops import attention as mm_attention  # noqa: E402

ATOL = 1e-5  # float32 outputs against sdpa/eager
GRAD_RTOL = 1e-4  # gradients: relative to the largest gradient of the parameter


class OpCounter(TorchDispatchMode):
    """Counts the ops that run below autograd."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket._qualified_op_name)] += 1
        return func(*args, **(kwargs or {}))

    def count(self, name: str) -> int:
        return self.ops[f"mmfuse::{name}"]

    def assert_no_torch_attention(self):
        bad = [op for op in self.ops if "scaled_dot_product" in op or "flash_attention" in op]
        assert not bad, f"PyTorch attention ran: {bad}"


def _pair(model_cls, config, reference: str = "sdpa", how: str = "set", how_cls=None):
    """The same random-init weights under ``reference`` and under "mmfuse" (three ways of asking)."""
    torch.manual_seed(0)
    config._attn_implementation = reference
    ref = model_cls(config).eval()
    if how == "set":
        ours = copy.deepcopy(ref)
        ours.set_attn_implementation("mmfuse")
    elif how == "from_config":  # how is the Auto class: AutoModel.from_config(cfg, attn_implementation="mmfuse")
        ours = how_cls.from_config(copy.deepcopy(config), attn_implementation="mmfuse").eval()
        assert type(ours) is model_cls
        ours.load_state_dict(ref.state_dict())
    else:  # the config attribute, as a user editing a loaded config would
        ours = copy.deepcopy(ref)
        ours.config._attn_implementation = "mmfuse"
        for sub in ours.modules():
            if hasattr(sub, "config") and sub.config is not ours.config:
                sub.config._attn_implementation = "mmfuse"
    assert ours.config._attn_implementation == "mmfuse"
    return ref, ours


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(ref, ours, run, n_calls: int, varlen: bool = False, backward: bool = True):
    """run(model) -> (output tensor, loss). Returns (fwd error, bwd error, the op counter)."""
    out_ref, loss_ref = run(ref)
    with OpCounter() as counter:
        out, loss = run(ours)
    counter.assert_no_torch_attention()
    fwd_op = "cross_attention_varlen_fwd" if varlen else "cross_attention_fwd"
    assert counter.count(fwd_op) == n_calls, counter.ops
    assert out.shape == out_ref.shape
    assert torch.isfinite(out).all()
    fwd_err = (out - out_ref).abs().max().item()
    assert fwd_err <= ATOL, fwd_err
    bwd_err = 0.0
    if backward:
        loss_ref.backward()
        with OpCounter() as bcounter:
            loss.backward()
        bcounter.assert_no_torch_attention()
        assert bcounter.count(fwd_op.replace("fwd", "bwd")) == n_calls, bcounter.ops
        g_ref, g = _grads(ref), _grads(ours)
        assert g_ref.keys() == g.keys() and g
        largest = max(t.abs().max().item() for t in g_ref.values())
        for name in g:
            scale = g_ref[name].abs().max().item()
            err = (g[name] - g_ref[name]).abs().max().item()
            assert err <= GRAD_RTOL * scale + 1e-6, (name, err, scale)
            bwd_err = max(bwd_err, err / largest)  # reported: relative to the largest gradient
    return fwd_err, bwd_err, counter


def _loss(x, valid=None, seed=1):
    """A loss whose gradient is not uniform: a fixed random projection of the outputs."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape, generator=gen)
    if valid is not None:
        w = w * valid.reshape(*valid.shape, *([1] * (x.dim() - valid.dim()))).to(w.dtype)
    return (x * w).sum()


def _left_padded(batch, length, vocab, pads, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


# ------------------------------------------------------------------------------------- models


def test_bert_padding_forms():
    """BERT (bidirectional encoder): right padding runs on kv_lens, other padding on key_padding_mask."""
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                                  intermediate_size=56, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    ref, ours = _pair(transformers.BertModel, cfg, how="from_config", how_cls=transformers.AutoModel)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (3, 11), generator=gen)
    for mask in (torch.tensor([[1] * 11, [1] * 7 + [0] * 4, [1] * 2 + [0] * 9]),          # right padding
                 torch.tensor([[1] * 11, [0] * 3 + [1] * 8, [1, 0] * 5 + [1]])):        # left / holes
        for m in (ref, ours):
            m.zero_grad()
        valid = mask.bool()
        _compare(ref, ours, lambda m: (lambda h: (h * valid[..., None], _loss(h, valid)))(
            m(input_ids=ids, attention_mask=mask).last_hidden_state), n_calls=2)
    form = mmhf.mmfuse_mask(3, 11, 11, mask_function=transformers.masking_utils.bidirectional_mask_function,
                            attention_mask=torch.tensor([[1] * 11, [1] * 7 + [0] * 4, [1] * 2 + [0] * 9]).bool())
    assert form._mmfuse_form.kv_lens.tolist() == [11, 7, 2] and form._mmfuse_form.key_padding_mask is None
    assert mmhf.mmfuse_mask(3, 11, 11, mask_function=transformers.masking_utils.bidirectional_mask_function,
                            attention_mask=torch.ones(3, 11, dtype=torch.bool)) is None


def test_clip_text_and_vision():
    """CLIP: causal text encoder with padding (key_padding_mask + causal) and the vision encoder (no mask)."""
    text = dict(vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, eos_token_id=2)
    vision = dict(hidden_size=40, intermediate_size=48, num_hidden_layers=2, num_attention_heads=5, image_size=30,
                  patch_size=6)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    ref, ours = _pair(transformers.CLIPModel, cfg)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 89, (3, 9), generator=gen)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5])
    ids[:, -1] = 2
    pixels = torch.randn(3, 3, 30, 30, generator=gen)

    def run(m):
        out = m(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        cat = torch.cat([out.text_embeds, out.image_embeds], 1)
        return cat, _loss(out.text_model_output.last_hidden_state, mask.bool()) + _loss(out.logits_per_image)

    _compare(ref, ours, run, n_calls=4)


def _whisper_config(**kw):
    return transformers.WhisperConfig(
        vocab_size=61, num_mel_bins=12, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, d_model=32, encoder_ffn_dim=40, decoder_ffn_dim=40, max_source_positions=15,
        max_target_positions=24, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None, **kw)


def test_whisper_encoder_decoder_cross():
    """Whisper: encoder self-attention, causal decoder self-attention, decoder → encoder cross-attention."""
    ref, ours = _pair(transformers.WhisperForConditionalGeneration, _whisper_config(), how="config")
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 12, 30, generator=gen)
    dec = torch.randint(3, 61, (2, 7), generator=gen)

    def run(m):
        logits = m(input_features=feats, decoder_input_ids=dec).logits
        return logits, _loss(logits)

    _compare(ref, ours, run, n_calls=6)  # 2 encoder + 2 decoder self + 2 cross


def test_whisper_generate_greedy():
    # init_std 0.2: logits spread enough that greedy decoding does not repeat one token
    ref, ours = _pair(transformers.WhisperForConditionalGeneration, _whisper_config(init_std=0.2))
    feats = torch.randn(2, 12, 30, generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=9, do_sample=False, num_beams=1)
    tokens_ref = ref.generate(feats, **kw)
    with OpCounter() as counter:
        tokens = ours.generate(feats, **kw)
    counter.assert_no_torch_attention()
    assert counter.count("cross_attention_fwd") > 0
    assert torch.equal(tokens, tokens_ref), (tokens, tokens_ref)
    assert tokens.shape[1] == 9 and len(set(tokens.flatten().tolist())) > 2


def _llama(**kw):
    base = dict(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return transformers.LlamaConfig(**base)


def test_llama_gqa_left_padding():
    ref, ours = _pair(transformers.LlamaForCausalLM, _llama(), how="from_config",
                      how_cls=transformers.AutoModelForCausalLM)
    ids, mask = _left_padded(3, 13, 101, pads=(0, 4, 1))
    valid = mask.bool()

    def run(m):
        logits = m(input_ids=ids, attention_mask=mask).logits
        return logits * valid[..., None], _loss(logits, valid)

    _compare(ref, ours, run, n_calls=2)


def test_llama_generate_greedy_left_padding():
    ref, ours = _pair(transformers.LlamaForCausalLM, _llama())
    ids, mask = _left_padded(3, 11, 101, pads=(0, 3, 5), seed=7)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=1)
    tokens_ref = ref.generate(ids, **kw)
    with OpCounter() as counter:
        tokens = ours.generate(ids, **kw)
    counter.assert_no_torch_attention()
    assert counter.count("cross_attention_fwd") == 2 * 8  # prefill + 7 decode steps, 2 layers
    assert torch.equal(tokens, tokens_ref)
    # a static cache: keys beyond the filled length are hidden by kv_lens (bottom-right at the query's position)
    kw["cache_implementation"] = "static"
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_mistral_sliding_window():
    cfg = transformers.MistralConfig(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=6, num_key_value_heads=3, sliding_window=5,
                                     max_position_embeddings=64, pad_token_id=0)
    ref, ours = _pair(transformers.MistralForCausalLM, cfg)
    ids, mask = _left_padded(2, 13, 101, pads=(0, 3), seed=8)
    valid = mask.bool()

    def run(m):
        logits = m(input_ids=ids, attention_mask=mask).logits
        return logits * valid[..., None], _loss(logits, valid)

    _compare(ref, ours, run, n_calls=2)
    kw = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, num_beams=1)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_gemma2_softcap_sliding_window():
    """Gemma 2: attention soft-capping (in-kernel softcap) on alternating sliding/full layers;
    transformers' sdpa refuses softcap, so the reference is eager."""
    cfg = transformers.Gemma2Config(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=4,
                                    attn_logit_softcapping=1.5, final_logit_softcapping=None,
                                    query_pre_attn_scalar=12, max_position_embeddings=64, pad_token_id=0)
    ref, ours = _pair(transformers.Gemma2ForCausalLM, cfg, reference="eager")
    ids, mask = _left_padded(2, 11, 101, pads=(0, 2), seed=9)
    valid = mask.bool()

    def run(m):
        logits = m(input_ids=ids, attention_mask=mask).logits
        return logits * valid[..., None], _loss(logits, valid)

    _compare(ref, ours, run, n_calls=2)


def test_t5_position_bias():
    """T5: the learned relative position_bias goes in as a float attn_mask whose gradient the
    kernel computes (relative_attention_bias.weight's gradient is compared)."""
    cfg = transformers.T5Config(vocab_size=83, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    ref, ours = _pair(transformers.T5ForConditionalGeneration, cfg)
    gen = torch.Generator().manual_seed(10)
    ids = torch.randint(1, 83, (3, 9), generator=gen)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 7 + [0] * 2])
    labels = torch.randint(1, 83, (3, 6), generator=gen)

    def run(m):
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        return out.logits, out.loss + _loss(out.logits)

    _compare(ref, ours, run, n_calls=6)
    assert ours.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad.abs().max() > 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=1)  # cached decoding, bias per step
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_gpt_oss_sinks_sliding_window():
    """gpt-oss: learned attention sinks (s_aux -> sinks, with their gradient) on a sliding and a full layer."""
    cfg = transformers.GptOssConfig(vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64,
                                    pad_token_id=0, layer_types=["sliding_attention", "full_attention"],
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    ref, ours = _pair(transformers.GptOssForCausalLM, cfg, reference="eager")
    for model in (ref, ours):  # sinks start at zero: make them matter
        for i, mod in enumerate(m for m in model.modules() if hasattr(m, "sinks")):
            with torch.no_grad():
                mod.sinks.copy_(torch.linspace(-1.0, 2.0, mod.sinks.numel()) + i)
    ids, mask = _left_padded(2, 11, 97, pads=(0, 3), seed=13)
    valid = mask.bool()

    def run(m):
        logits = m(input_ids=ids, attention_mask=mask).logits
        return logits * valid[..., None], _loss(logits, valid)

    _compare(ref, ours, run, n_calls=2)
    assert ours.model.layers[0].self_attn.sinks.grad.abs().max() > 0


def test_mllama_cross_attention_own_float_masks():
    """Mllama: the vision encoder's and the text cross-attention's own 4-D float masks go to the
    kernel as float attn_masks; the causal text layers use mmfuse's mask forms."""
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                  image_size=28, patch_size=14, max_num_tiles=2, intermediate_layers_indices=[0],
                  vision_output_dim=64, supported_aspect_ratios=[[1, 1], [1, 2]])
    text = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=[1], max_position_embeddings=64, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=96)
    ref, ours = _pair(transformers.MllamaForConditionalGeneration, cfg)
    gen = torch.Generator().manual_seed(14)
    pixels = torch.randn(2, 1, 2, 3, 28, 28, generator=gen)
    ids = torch.randint(3, 90, (2, 9), generator=gen)
    ids[:, 1] = 96
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    cross = torch.zeros(2, 9, 1, 2, dtype=torch.long)
    cross[:, 1:, 0, 0] = 1
    cross[0, 1:, 0, 1] = 1
    valid = mask.bool()

    def run(m):
        logits = m(input_ids=ids, attention_mask=mask, pixel_values=pixels, aspect_ratio_ids=torch.tensor([[2], [1]]),
                   aspect_ratio_mask=torch.tensor([[[1, 1]], [[1, 0]]]), cross_attention_mask=cross).logits
        return logits * valid[..., None], _loss(logits, valid)

    _compare(ref, ours, run, n_calls=6)  # vision: 2 local + 1 global layers; text: 2 self + 1 cross


def test_llama_attention_dropout_in_training(monkeypatch):
    """Training-mode attention dropout runs in-kernel (Philox, seeded from torch's generator): the
    same seed reproduces it, and mmfuse's reference backend (MMFUSE_BACKEND=reference, asked
    for explicitly) drops the same elements."""
    cfg = _llama(attention_dropout=0.3)
    cfg._attn_implementation = "mmfuse"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    ids, mask = _left_padded(2, 13, 101, pads=(0, 3), seed=15)
    valid = mask.bool()

    def run():
        torch.manual_seed(5)
        with OpCounter() as counter:
            logits = model(input_ids=ids, attention_mask=mask).logits
        counter.assert_no_torch_attention()
        assert counter.count("cross_attention_fwd") == 2
        return logits[valid]

    first, again = run(), run()
    assert torch.equal(first, again)
    model.eval()
    assert (first - model(input_ids=ids, attention_mask=mask).logits[valid]).abs().max() > 1e-2
    model.train()
    monkeypatch.setenv("MMFUSE_BACKEND", "reference")
    torch.manual_seed(5)
    reference = model(input_ids=ids, attention_mask=mask).logits[valid]
    assert (reference - first).abs().max() <= ATOL


# ----------------------------------------------------------------------------- padding-free


def test_llama_padding_free_training_matches_padded_sdpa():
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) under "mmfuse" (cross_attention_varlen)
    trains to the same losses as padded batches under "sdpa"."""
    from transformers import DataCollatorWithFlattening

    ref, ours = _pair(transformers.LlamaForCausalLM, _llama())
    gen = torch.Generator().manual_seed(11)
    lengths = (7, 12, 3, 9)
    seqs = [torch.randint(3, 101, (n,), generator=gen).tolist() for n in lengths]
    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s} for s in seqs])
    width = max(lengths)
    padded = torch.zeros(len(seqs), width, dtype=torch.long)
    amask = torch.zeros_like(padded)
    for b, s in enumerate(seqs):
        padded[b, :len(s)] = torch.tensor(s)
        amask[b, :len(s)] = 1
    labels = padded.masked_fill(amask == 0, -100)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    losses_ref, losses = [], []
    for _ in range(3):
        loss_ref = ref(input_ids=padded, attention_mask=amask, labels=labels).loss
        with OpCounter() as counter:
            loss = ours(**flat).loss
            loss.backward()
        counter.assert_no_torch_attention()
        assert counter.count("cross_attention_varlen_fwd") == 2 and counter.count("cross_attention_varlen_bwd") == 2
        loss_ref.backward()
        opt_ref.step(), opt.step(), opt_ref.zero_grad(), opt.zero_grad()
        losses_ref.append(loss_ref.item()), losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert max(abs(a - b) for a, b in zip(losses, losses_ref)) <= 1e-5, (losses, losses_ref)


def test_padding_free_sliding_window_and_bad_mask():
    """Packed sequences with a sliding window (Mistral): the window becomes a packed per-row mask."""
    from transformers import DataCollatorWithFlattening

    cfg = transformers.MistralConfig(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=6, num_key_value_heads=2, sliding_window=4,
                                     max_position_embeddings=64, pad_token_id=0)
    ref, ours = _pair(transformers.MistralForCausalLM, cfg)
    gen = torch.Generator().manual_seed(12)
    seqs = [torch.randint(3, 101, (n,), generator=gen).tolist() for n in (9, 5, 11)]
    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s} for s in seqs])
    flat.pop("labels")
    with OpCounter() as counter:
        out = ours(**flat).logits
    assert counter.count("cross_attention_varlen_fwd") == 2
    start = 0
    for s in seqs:  # each packed sequence equals that sequence alone under sdpa
        alone = ref(input_ids=torch.tensor([s])).logits
        assert (out[:, start:start + len(s)] - alone).abs().max() <= ATOL
        start += len(s)
    # a padding mask together with the packed kwargs would be dropped by the kernel: refused
    holes = torch.ones_like(flat["input_ids"])
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="cu_seq_lens_q/k"):
        ours(**flat, attention_mask=holes)


# --------------------------------------------------------------------------------- contract


def test_mask_function_forms():
    causal = transformers.masking_utils.causal_mask_function
    assert mmhf.mmfuse_mask(2, 5, 5, mask_function=causal) is None  # pure causal: is_causal
    assert mmhf.mmfuse_mask(2, 1, 9, q_offset=8, mask_function=causal) is None  # decode step
    chunk = mmhf.mmfuse_mask(2, 3, 8, q_offset=5, mask_function=causal)  # chunked prefill: bottom-right
    assert chunk._mmfuse_form.causal and chunk._mmfuse_form.kv_lens is None and chunk.all()
    static = mmhf.mmfuse_mask(2, 1, 16, q_offset=6, mask_function=causal,
                              attention_mask=torch.ones(2, 7, dtype=torch.bool))  # static cache of 16
    assert static._mmfuse_form.kv_lens.tolist() == [7, 7] and static._mmfuse_form.key_padding_mask is None
    left = torch.tensor([[1] * 6, [0, 0] + [1] * 4]).bool()
    padded = mmhf.mmfuse_mask(2, 6, 6, mask_function=causal, attention_mask=left)
    assert torch.equal(padded._mmfuse_form.key_padding_mask, ~left) and padded._mmfuse_form.causal


def test_errors_name_the_feature(monkeypatch):
    cfg = transformers.Gemma2Config(vocab_size=53, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                                    attn_logit_softcapping=3.0, max_position_embeddings=32)
    _, ours = _pair(transformers.Gemma2ForCausalLM, cfg, reference="eager")
    ids = torch.randint(1, 53, (1, 5))
    with pytest.raises(ValueError, match="output_attentions"):
        ours(input_ids=ids, output_attentions=True)
    # a kernel without softcap: the error names softcap and the config setting, nothing falls back
    monkeypatch.setitem(mm_attention._FEATURES, "cpu", mm_attention._FEATURES["cpu"] - {"softcap"})
    with pytest.raises(NotImplementedError, match="softcap=3.0 \\(config.attn_logit_softcapping\\)"):
        ours(input_ids=ids)


# ------------------------------------------------------------------------- benchmark peer


def test_whisper_feature_extractor_is_a_front_end_peer():
    """mmfuse-bench: transformers' WhisperFeatureExtractor (what Whisper users call) is a peer of
    whisper_log_mel and computes the same features; every front-end row has a peer and running
    our side prints no warning of our own (torchaudio's defaults leave empty mel filters)."""
    import warnings

    from mmfuse.bench import spectrogram as bench

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cases = list(bench.cases(torch.device("cpu"), True, ["cpu"]))
        for case in cases:
            assert case.peers, f"{case.op} {case.case} has no peer"
            for fn in case.ours.values():
                fn()
    whisper = next(c for c in cases if c.op == "whisper_log_mel")
    ours = whisper.ours["cpu"]()
    theirs = whisper.peers["transformers WhisperFeatureExtractor"]()
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() <= 1e-4
