"""Parameter and FLOP counts, checked against counts worked out by hand."""

from gptforge.model.flops import flops_per_token, num_params
from gptforge.model.gpt import GPT, GPTConfig


def gpt2_small(**overrides) -> GPTConfig:
    """GPT-2 124M's shape: 12 layers, 12 heads, 768 wide, 1024 context, learned positions, biases, tied head."""
    fields = dict(vocab_size=50257, vocab_multiple=128, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                  mlp="gelu", mlp_ratio=4.0, norm="layernorm", pos="learned", bias=True, tie_embeddings=True,
                  qk_norm=False)
    return GPTConfig(**{**fields, **overrides})


def small_config(tie: bool, **overrides) -> GPTConfig:
    fields = dict(vocab_size=100, vocab_multiple=64, block_size=32, n_layer=2, n_head=4, n_embd=64,
                  mlp="gelu", norm="layernorm", pos="learned", bias=True, tie_embeddings=tie, qk_norm=False)
    return GPTConfig(**{**fields, **overrides})


def test_param_count_by_hand():
    C, V, T, L = 64, 128, 32, 2  # V is the padded vocabulary
    layernorm = 2 * C  # gain and bias
    attn = (C * 3 * C + 3 * C) + (C * C + C)  # c_attn, c_proj
    mlp = (C * 4 * C + 4 * C) + (4 * C * C + C)  # c_fc, c_proj
    block = 2 * layernorm + attn + mlp
    embedding = V * C + T * C  # wte, wpe
    total = embedding + L * block + layernorm  # + ln_f; the tied head adds nothing

    counts = num_params(small_config(tie=True))

    assert counts == {"total": total, "embedding": embedding, "non_embedding": total - embedding}
    assert num_params(GPT(small_config(tie=True))) == counts
    assert GPT(small_config(tie=True)).num_params() == total


def test_qk_norm_adds_one_gain_per_head_dimension_for_queries_and_keys():
    L, head_dim = 2, 64 // 4
    plain, normed = num_params(small_config(tie=True)), num_params(small_config(tie=True, qk_norm=True))
    gains = L * 2 * head_dim  # q_norm and k_norm: one RMSNorm gain over head_dim each, shared by the heads
    assert normed["total"] == plain["total"] + gains
    assert normed["non_embedding"] == plain["non_embedding"] + gains
    assert GPT(small_config(tie=True, qk_norm=True)).num_params() == normed["total"]


def test_untied_head_counts_as_non_embedding():
    tied, untied = num_params(small_config(tie=True)), num_params(small_config(tie=False))
    assert untied["total"] == tied["total"] + 128 * 64
    assert untied["embedding"] == tied["embedding"]
    assert untied["non_embedding"] == tied["non_embedding"] + 128 * 64


def test_gpt2_small_has_its_published_parameter_count():
    # 124,439,808: the figure for the released GPT-2 124M checkpoint (unpadded 50257-token vocabulary).
    assert num_params(gpt2_small(vocab_multiple=1))["total"] == 124_439_808


def test_gpt2_small_flops_per_token():
    L, H, Q, T, C, V = 12, 12, 64, 1024, 768, 50304
    block_matmuls = C * 3 * C + C * C + C * 4 * C + 4 * C * C  # 12 * C**2 = 7,077,888
    n = L * block_matmuls + V * C  # 84,934,656 + 38,633,472 (head, padded, counted once) = 123,568,128
    expected = 6 * n + 12 * L * H * Q * T  # 741,408,768 + 113,246,208
    assert expected == 854_654_976

    assert flops_per_token(gpt2_small()) == expected
    assert flops_per_token(gpt2_small(tie_embeddings=False)) == expected  # the lookup is not a matmul


def test_swiglu_flops_count_its_three_matrices():
    config = GPTConfig(vocab_size=256, vocab_multiple=128, block_size=64, n_layer=2, n_head=4, n_embd=128,
                       mlp="swiglu", pos="rope")
    C, hidden = 128, config.mlp_hidden  # 384: 2/3 of 4 * 128, rounded up to a multiple of 64
    n = 2 * (4 * C * C + 3 * C * hidden) + 256 * C
    assert flops_per_token(config) == 6 * n + 12 * 2 * 4 * 32 * 64
