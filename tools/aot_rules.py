"""The rules of the GPU-readiness audit (tools/aot_audit.py), as pure functions of its findings.

A separate module so the rules can be tested without the audit's capture machinery (which replaces
``JITFunction.run`` for the whole process): tests/test_aot_rules.py.
"""

from __future__ import annotations

NUM_SMS = 132  # H100 SXM; an A100 has 108
SMEM_PER_BLOCK = {80: 166_912, 90: 232_448}
SMEM_PER_SM = {80: 167_936, 90: 233_472}
GRID_LIMITS = (2**31 - 1, 65_535, 65_535)

# Kernels whose launches may stay under one wave at the benchmark shapes: kernel -> (the fewest programs
# accepted, the reason). The kernel's source says the same at more length.
SMALL_BY_DESIGN: dict[str, tuple[int, str]] = {
    "_lm_stats_combine_kernel": (1, "merges (max, sum-exp) partials: at most 64 pairs per row, a few KB in all"),
    "_row_combine_kernel": (1, "merges label_histogram's row-statistic partials: at most 64 per row"),
    "_lm_sum_splits_kernel": (1, "adds the dense map's split-K partials in fixed order: (splits, B, T) floats"),
    "_pa_sum_splits_kernel": (1, "adds the prefix dK/dV split partials in fixed order: about 2 MB at the "
                                 "training shapes, elementwise"),
    "_pa_decode_reduce_kernel": (1, "combines the split-K partial states of decode, (S, B*Hq*Lq, d+2) floats"),
    "_pa_prefix_state_kernel": (16, "decode stage 1 at B=16 and P=512..2048: chunks shorter than 256 prefix keys "
                                    "would write more partial state than the prefix bytes they split"),
    "_pa_decode_seq_kernel": (128, "one program per (batch row, kv head): 128 of 132 SMs at B=16, Hkv=8; own "
                                   "caches under 512 keys are not split (a reduce launch for 4 idle SMs)"),
}
# An op call whose registered kernels take and return fewer bytes than this is bound by launch latency, not by
# the SMs it occupies: at an H100's 3.35 TB/s, 4 MiB is 1.3 us, less than one kernel launch. One wave is not
# required there (smaller tiles and more splits would only add partials and a reduction launch).
SMALL_OP_BYTES = 4 << 20
# fp32-only kernels whose FMA dots spill at the chosen tiles (bytes of spill stores, per arch), each explained
# in the kernel's source; a regression past the budget fails the gate.
FP32_SPILL_BUDGET: dict[str, int] = {  # worst arch and Triton version (3.9, and 3.6 on the lent GPUs)
    "_pa_bwd_dq_kernel": 16,        # d = 128, sm_90, 3.9: see _FP32_TILES in triton/prefix_attention.py
    "_pa_prefix_state_kernel": 56,  # decode stage 1, d = 128 / 256, sm_80, 3.6: same place
    "_pa_bwd_dprefix_kernel": 40,   # d = 256, sm_80, 3.9: same place
    "_pa_decode_seq_kernel": 16,    # decode pass 2, d = 64, sm_90, 3.6: same place
    "_hist_kernel": 40,             # prob + top-k, sm_90, 3.6: at its launch in triton/label_histogram.py
    "_vp_bwd_kernel": 32,           # tensor mask, sm_80, 3.6: at its launch in triton/visual_prompt.py
}


def violations(records: list[dict], cuda_records: list[dict], results: list[dict]) -> list[str]:
    """Every rule broken, one line each.

    records / cuda_records: per scenario ``{op, name, wave, error?, phases: {phase: {syncs: {what: n},
    launches: [(kernel, (gx, gy, gz))]}}}`` (Triton launchers, CUDA launchers); results: per compiled kernel
    and arch ``{kernel, config, dtype ("16bit" | "fp32"), arch, error? | regs, spill, smem, dots, mma}``.
    """
    bad = []
    for rec in records + cuda_records:
        tag = f"{rec['op']}/{rec['name']}" + (" [cuda launcher]" if rec.get("launcher") == "cuda" else "")
        if "error" in rec:
            bad.append(f"{tag}: the op failed: {rec['error']}")
        for phase, d in rec.get("phases", {}).items():
            for what, n in d["syncs"].items():
                bad.append(f"{tag} {phase}: {n} host sync(s): {what}")
    for rec in records:
        for phase, d in rec.get("phases", {}).items():
            for name, g in d["launches"]:
                if any(a > lim for a, lim in zip(g, GRID_LIMITS, strict=True)):
                    bad.append(f"{rec['op']}/{rec['name']} {phase}: {name} grid {g} past CUDA's limits")
                progs = g[0] * g[1] * g[2]
                big = d.get("op_bytes", SMALL_OP_BYTES) >= SMALL_OP_BYTES
                floor = SMALL_BY_DESIGN[name][0] if name in SMALL_BY_DESIGN else NUM_SMS
                if rec["wave"] and big and progs < min(NUM_SMS, floor):
                    bad.append(f"{rec['op']}/{rec['name']} {phase}: {name} grid {g} = {progs} programs "
                               f"< {NUM_SMS} (one wave)")
    for r in results:
        tag = f"{r['kernel']} [{r['config']}] {r['dtype']} sm{r['arch']}"
        if "error" in r:
            bad.append(f"{tag}: compile error: {' '.join(r['error'].split())[:400]}")
            continue
        if r["smem"] > SMEM_PER_BLOCK[r["arch"]]:
            bad.append(f"{tag}: shared memory {r['smem']} B > {SMEM_PER_BLOCK[r['arch']]} B")
        elif not r["dots"] and r["smem"] and SMEM_PER_SM[r["arch"]] // (r["smem"] + 1024) < 2:
            bad.append(f"{tag}: shared memory {r['smem']} B leaves no room for 2 CTAs/SM (memory-bound kernel)")
        if r["dtype"] == "16bit":
            if r["spill"] != 0:
                bad.append(f"{tag}: {r['spill']} B of register spills in a 16-bit kernel")
            if r["mma"] == "FMA":
                bad.append(f"{tag}: dot on FMA units, not tensor cores, in a 16-bit kernel")
        elif r["spill"] > FP32_SPILL_BUDGET.get(r["kernel"], 0):
            bad.append(f"{tag}: {r['spill']} B of register spills > budget "
                       f"{FP32_SPILL_BUDGET.get(r['kernel'], 0)} B")
    return bad
