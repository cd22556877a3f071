"""The papers' numbers that the evidence run compares against — citations, never measurements.

Every constant names its source (tags as in the project's reference notes: [B158] is arXiv
2402.17764v1, [2B4T] arXiv 2504.12285v2, [B1] arXiv 2310.11453, [bcpp] arXiv 2410.16144).
Our own figures all come from the run; nothing here is ever reported as ours.
"""

from __future__ import annotations

SOURCES = {
    "B158": "BitNet b1.58, arXiv 2402.17764v1",
    "2B4T": "BitNet b1.58 2B4T Technical Report, arXiv 2504.12285v2",
    "B1": "BitNet, arXiv 2310.11453",
    "bcpp": "1-bit AI Infra: Part 1.1 (bitnet.cpp), arXiv 2410.16144",
}

# [B158] Table 1: LLaMA vs BitNet b1.58 at 700M / 1.3B / 3B, trained on 100B tokens; memory (GB)
# and time per output token (ms) on a GPU (FasterTransformer + Ladder 2-bit kernel); PPL is the
# WikiText2/C4 validation perplexity. The ratios are the paper's own (LLaMA / BitNet).
TABLE1 = {
    "700m": {"llama_gb": 2.08, "bitnet_gb": 0.80, "memory_ratio": 2.60,
             "llama_ms": 1.18, "bitnet_ms": 0.96, "latency_ratio": 1.23,
             "llama_ppl": 12.33, "bitnet_ppl": 12.87},
    "1.3b": {"llama_gb": 3.34, "bitnet_gb": 1.14, "memory_ratio": 2.93,
             "llama_ms": 1.62, "bitnet_ms": 0.97, "latency_ratio": 1.67,
             "llama_ppl": 11.25, "bitnet_ppl": 11.29},
    "3b": {"llama_gb": 7.89, "bitnet_gb": 2.22, "memory_ratio": 3.55,
           "llama_ms": 5.07, "bitnet_ms": 1.87, "latency_ratio": 2.71,
           "llama_ppl": 10.04, "bitnet_ppl": 9.91},
}
# Parameter counts the paper's size names stand for (for the perplexity-ratio plot's x axis).
TABLE1_PARAMS = {"700m": 0.7e9, "1.3b": 1.3e9, "3b": 3.0e9}

# [2B4T] Table 1 (BitNet b1.58 2B4T instruct): non-embedding memory, CPU time per output token
# (Surface Laptop Studio 2, i7-13800H, 8 threads, bitnet.cpp), estimated energy (7 nm model,
# 512 tokens).
B2B4T = {"non_embedding_gb": 0.4, "cpu_tpot_ms": 29.0, "cpu_threads": 8, "energy_j": 0.028,
         "energy_tokens": 512}

# [B1] Table 2, 7 nm rows (repeated in [2B4T] Table 4): energy per operation, picojoules.
ENERGY_7NM_PJ = {"fp32_add": 0.38, "fp32_mul": 1.31, "fp16_add": 0.16, "fp16_mul": 0.34,
                 "int8_add": 0.007, "int8_mul": 0.07}
PROCESS_NM = 7
# [B158]: b1.58's matmul saves 71.4x arithmetic energy at 7 nm (FP16 add + mul vs INT8 add).
MATMUL_ENERGY_SAVING = 71.4

# [bcpp] abstract: bitnet.cpp on x86 CPUs vs llama.cpp full precision.
BCPP_X86_SPEEDUP = (2.37, 6.17)
BCPP_X86_ENERGY_REDUCTION_PCT = (71.9, 82.2)


def as_dict() -> dict:
    """All of the above, for results.json (so every cited number is in the run's record)."""
    return {"sources": SOURCES, "b158_table1": TABLE1, "b158_table1_params": TABLE1_PARAMS,
            "b2b4t_table1": B2B4T, "energy_7nm_pj": ENERGY_7NM_PJ, "process_nm": PROCESS_NM,
            "matmul_energy_saving": MATMUL_ENERGY_SAVING, "bcpp_x86_speedup": list(BCPP_X86_SPEEDUP),
            "bcpp_x86_energy_reduction_pct": list(BCPP_X86_ENERGY_REDUCTION_PCT)}
