"""Weights per GPU as TensorRT-LLM holds them, against a hand computation for DeepSeek-V3.2 (block FP8) at TP8 with
and without attention-DP, with and without MTP decoding; and the KV pool that follows from them.

The hand computation starts from the rank-file bytes (checked byte for byte elsewhere) and applies, in explicit
arithmetic on DeepSeek-V3.2's shapes, each difference docs/choosing-a-layout.md records from TensorRT-LLM's loader:
the whole BF16 embedding on every rank, the MTP layer only with MTP decoding and then without its own embedding /
LM head copies, eh_proj row-split over TP unless attention-DP, and the transposed FP8 copy of kv_b_proj's key half
(plus BF16 copies of both halves on Blackwell)."""

from __future__ import annotations

import pytest

from builder.plan.search import plan_cluster

GIB = 1 << 30
V, H = 129280, 7168  # vocabulary, hidden size
HEADS, KV_LORA, NOPE, V_HEAD = 128, 512, 128, 128
LAYERS = 61
EMBED = V * H * 2  # BF16
EH_PROJ = H * 2 * H * 2  # BF16 [7168, 14336]


def k_b_proj_trans(heads: int, *, blackwell: bool) -> int:
    fp8 = heads * KV_LORA * NOPE + heads * (KV_LORA // 128) * (NOPE // 128) * 4  # values + fp32 block scales
    bf16 = 2 * (heads * KV_LORA * NOPE + heads * V_HEAD * KV_LORA) if blackwell else 0
    return fp8 + bf16


def one(gpu: str, *, adp: bool, draft_len: int, include_mtp: bool = True):
    (lp,) = plan_cluster(model="deepseek-v3.2", gpu=gpu, tp=8, pp=1, ep=8, attention_dp=adp,
                         draft_len=draft_len, concurrency=64, include_mtp=include_mtp).layouts
    return lp


def mtp_layer_rank_bytes(adp: bool) -> int:
    """The MTP module's bytes in rank 0's file: the file with it minus the file of a checkpoint without it."""
    return one("h200-sxm", adp=adp, draft_len=0).weights_per_rank[0] \
        - one("h200-sxm", adp=adp, draft_len=0, include_mtp=False).weights_per_rank[0]


@pytest.mark.parametrize("gpu,blackwell", [("h200-sxm", False), ("b200", True)])
@pytest.mark.parametrize("adp", [False, True], ids=["attention-tp", "attention-dp"])
@pytest.mark.parametrize("draft_len", [0, 3], ids=["no-mtp", "mtp3"])
def test_trtllm_weights_follow_its_loader(gpu, blackwell, adp, draft_len):
    lp = one(gpu, adp=adp, draft_len=draft_len)
    t = lp.runtime_weight_detail
    rank0 = lp.weights_per_rank[0]
    assert t["rank_files"] == rank0 == max(lp.weights_per_rank)  # EP8 over 256 experts: every rank alike
    heads = HEADS if adp else HEADS // 8
    # Our rules split the embedding by vocabulary under attention-TP and keep it whole under attention-DP.
    assert t["embedding_replicated"] == (0 if adp else EMBED - EMBED // 8)
    if draft_len:
        # MTP decoding: the module is loaded, minus its own embedding and LM head (whole under attention-DP).
        assert t["mtp_dropped"] == (2 * EMBED if adp else 2 * EMBED // 8)
        assert t["eh_proj_split"] == (0 if adp else EH_PROJ - EH_PROJ // 8)
        layers = LAYERS + 1
    else:
        assert t["mtp_dropped"] == mtp_layer_rank_bytes(adp)  # the whole MTP layer
        assert t["eh_proj_split"] == 0
        layers = LAYERS
    assert t["mla_copies"] == layers * k_b_proj_trans(heads, blackwell=blackwell)
    total = rank0 + t["embedding_replicated"] - t["mtp_dropped"] - t["eh_proj_split"] + t["mla_copies"]
    assert t["total"] == total
    # Feasibility and the KV pool follow what TensorRT-LLM holds, not the rank files.
    assert lp.weights_per_stage == [max(lp.runtime_weights_per_rank)]
    mem = lp.to_dict()["memory_per_gpu_gib"]
    assert mem["weights"] == pytest.approx(max(lp.runtime_weights_per_rank) / GIB, abs=1e-3)
    assert mem["rank_files"] == pytest.approx(max(lp.weights_per_rank) / GIB, abs=1e-3)


def test_the_mtp_layer_is_about_two_gigabytes_of_a_tp8_rank():
    """Block-FP8 experts (256 x 44M parameters / 8 ranks), attention, the BF16 eh_proj and the MTP module's own
    embedding and LM head slices: 2.0 GiB per TP8 rank, the part TensorRT-LLM leaves out without MTP decoding."""
    mtp = mtp_layer_rank_bytes(adp=False)
    experts = 256 * 3 * H * 2048 // 8  # FP8 values only
    assert experts + 2 * EMBED // 8 + EH_PROJ < mtp < experts + 2 * EMBED // 8 + EH_PROJ + 0.2 * GIB


def test_kv_pool_is_the_fraction_of_what_the_profiling_forward_leaves():
    lp = one("h200-sxm", adp=True, draft_len=0)
    capacity = 143771 * (1 << 20)
    free = capacity - max(lp.runtime_weights_per_rank) - lp.activations - 2 * GIB
    assert lp.kv_pool == int(free * 0.9)
    per_seq = LAYERS * (576 + 132) * 2048  # FP8 latent + DSA indexer key, isl + osl = 2048 tokens
    assert lp.max_seqs_replica == lp.kv_pool // per_seq * 8  # attention-DP: every rank caches its own requests
