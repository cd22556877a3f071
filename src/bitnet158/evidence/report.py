"""report.md and the printed summary, rendered from the results dict alone: every number shown is
a value of results.json (ours measured in the run, the paper's cited in paper.py), formatted."""

from __future__ import annotations

from .paper import B2B4T, BCPP_X86_ENERGY_REDUCTION_PCT, BCPP_X86_SPEEDUP, MATMUL_ENERGY_SAVING, TABLE1
from .quality import LABELS


PAPER_LABELS = {"700m": "700M", "1.3b": "1.3B", "3b": "3B"}
NOT_MEASURED = "not measured in this mode (--full measures it)"


def num(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def _x(value: float, digits: int = 2) -> str:
    return f"{num(value, digits)}×"


def _by_preset(rows: list[dict], preset: str) -> dict | None:
    return next((r for r in rows if r["preset"] == preset), None)


def _depth_note(row: dict) -> str:
    parts = []
    if row["layers"] != row["full_layers"]:
        parts.append(f"{row['layers']} of {row['full_layers']} layers")
    if row.get("vocab_cut"):
        parts.append(f"vocabulary cut to {row['vocab_size']:,}")
    return f" ({', '.join(parts)})" if parts else ""


def _per_shape(shapes: list[dict], key: str) -> str:
    """'71.4× at every shape' when the formatted values agree, else one value per shape."""
    values = [_x(s[key], 1) for s in shapes]
    if len(set(values)) == 1:
        return f"{values[0]} at every shape"
    return "; ".join(f"{v} ({s['name']})" for v, s in zip(values, shapes))


def build_claims(results: dict) -> list[dict]:
    """Each claim: the paper's number, ours, the conditions. Ours are formatted from `results`."""
    claims = []
    q = results.get("quality")
    cost = results.get("cost")
    energy = results.get("energy")
    paper_ratios = results["paper"]["b158_ppl_ratio"]
    if q:
        ours = "; ".join(f"{num(s['ppl_ratio_b158_fp'], 3)} ({s['name']})" for s in q["sizes"] if "ppl_ratio_b158_fp" in s)
        trend = {True: "gap shrinks with size", False: "gap does not shrink with size", None: "trend undecided"}
        claims.append({
            "claim": "b1.58 perplexity close to FP, gap shrinks with size",
            "paper": "; ".join(f"{num(v, 3)} ({k})" for k, v in paper_ratios.items()),
            "ours": f"{ours}; {trend[q['gap_shrinks_with_size']]}",
            "conditions": f"b1.58 / FP held-out perplexity; ours {num(q['train']['tokens_per_model'], 0)} training "
                          f"tokens per model, {q['sizes'][0]['linear_parameters']:,}–{q['sizes'][-1]['linear_parameters']:,} "
                          "linear parameters; paper 100B tokens, 700M–3B",
            "source": "B158 Table 1"})
        if all("ppl_ratio_b1_fp" in s for s in q["sizes"]):
            b1 = "; ".join(f"{num(s['ppl_ratio_b1_fp'], 3)} vs {num(s['ppl_ratio_b158_fp'], 3)} ({s['name']})"
                           for s in q["sizes"])
            claims.append({"claim": "ternary (b1.58) models better than binary (b1)", "paper": "stated (0 allows feature filtering), no figure",
                           "ours": f"b1/FP vs b1.58/FP perplexity ratio: {b1}",
                           "conditions": "same sizes, tokens and seed as above", "source": "B158 section 1"})
    if cost:
        rows = cost["shapes"]
        memory_cond = (f"ours: whole model, i2 + int8 head vs bf16 tensors, CPU, {cost['threads']} threads, "
                       f"kernel {cost['kernel_path']}; paper: GPU")
        latency_cond = (f"ours: CPU, {cost['threads']} threads, torch bf16 baseline, {cost['prompt_tokens']}-token "
                        "prompt; paper: GPU, FasterTransformer + Ladder")
        for key, what, cond in (("memory_ratio", "memory saving vs FP16", memory_cond),
                                ("latency_ratio", "decode speed-up vs full precision", latency_cond)):
            for preset_name, p in TABLE1.items():
                r = _by_preset(rows, preset_name)
                claims.append({
                    "claim": f"{what}, {PAPER_LABELS[preset_name]}", "paper": _x(p[key]),
                    "ours": _x(r[key]) + _depth_note(r) if r else NOT_MEASURED,
                    "conditions": cond if r else "—", "source": "B158 Table 1"})
        r = _by_preset(rows, "2b4t")
        claims.append({
            "claim": "2B4T non-embedding memory", "paper": f"{num(B2B4T['non_embedding_gb'], 1)} GB",
            "ours": f"{num(r['linear_packed_gb'], 3)} GB" + _depth_note(r) if r else NOT_MEASURED,
            "conditions": (f"ours: i2-packed linear layers as held in memory, "
                           f"{num(r['linear_bits_per_weight'], 2)} bits per weight") if r else "—",
            "source": "2B4T Table 1"})
        claims.append({
            "claim": "2B4T CPU time per output token", "paper": f"{num(B2B4T['cpu_tpot_ms'], 0)} ms",
            "ours": f"{num(r['decode_ms_packed'], 1)} ms" + _depth_note(r) if r else NOT_MEASURED,
            "conditions": (f"ours: {cost['threads']} threads on this machine; paper: i7-13800H, "
                           f"{B2B4T['cpu_threads']} threads, bitnet.cpp") if r else "—",
            "source": "2B4T Table 1"})
        lat = [r["latency_ratio"] for r in rows]
        claims.append({"claim": "CPU decode speed-up vs full precision",
                       "paper": f"{_x(BCPP_X86_SPEEDUP[0])}–{_x(BCPP_X86_SPEEDUP[1])}",
                       "ours": _x(lat[0]) if len(lat) == 1 else f"{_x(min(lat))}–{_x(max(lat))}",
                       "conditions": "ours: our packed runtime vs torch bf16 over the shapes above; paper: bitnet.cpp "
                                     "vs llama.cpp on x86", "source": "bcpp abstract"})
    if energy:
        shapes = energy["shapes"]
        claims.append({
            "claim": "matmul arithmetic energy saving at 7 nm", "paper": _x(MATMUL_ENERGY_SAVING, 1),
            "ours": _per_shape(shapes, "ratio_paper_accounting") + "; with our fp32 rescale "
                    + _per_shape(shapes, "ratio_with_rescale"),
            "conditions": "op-count model on our linear layers: N·K fp16 mul+add vs N·K int8 add per token",
            "source": "B158 section 3, B1 Table 2"})
        e2 = next((s for s in shapes if s["name"] == "2B4T"), None)
        if e2 is not None:
            claims.append({
                "claim": f"2B4T estimated energy, {energy['estimate_tokens']} tokens",
                "paper": f"{num(B2B4T['energy_j'], 3)} J",
                "ours": f"{num(e2['ternary_j_estimate'], 4)} J (FP16 twin {num(e2['fp16_j_estimate'], 3)} J)",
                "conditions": "ours: the same 7 nm op-count model over the linear layers only",
                "source": "2B4T Table 1"})
        rapl = energy["rapl"]
        if rapl["available"] and cost:
            red = [r["energy_reduction_pct"] for r in cost["shapes"]]
            ours = f"{num(min(red), 1)}–{num(max(red), 1)} % (RAPL package energy per decoded token)"
        else:
            ours = f"not measured: {rapl['reason']}"
        claims.append({"claim": "measured CPU energy reduction vs full precision",
                       "paper": f"{num(BCPP_X86_ENERGY_REDUCTION_PCT[0], 1)}–{num(BCPP_X86_ENERGY_REDUCTION_PCT[1], 1)} %",
                       "ours": ours, "conditions": "ours: packed vs torch bf16 decode; paper: bitnet.cpp vs llama.cpp, x86",
                       "source": "bcpp abstract"})
    return claims


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def build_report(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    out = ["# Evidence: the BitNet b1.58 papers' claims, measured on our own models", ""]
    out += [f"Mode **{results['mode']}** ({s['note']}); {results['created']}; took {num(results['minutes'], 1)} min.",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, {num(m['ram_gib'], 1)} GiB RAM; torch {m['torch']}, "
            f"{m['threads']} threads; packed kernel path `{m['kernel_path']}`"
            + ("" if m["extension"] else f" (compiled extension missing: {m['extension_error']})") + ".", ""]
    if results["mode"] == "smoke":
        out += ["**This is the internal smoke setting: the figures below only show that the code path runs; "
                "they are not evidence of anything.**", ""]
    out += ["Every figure under *ours* was measured or computed in this run and is stored in `results.json`; "
            "the paper's figures are citations (sources at the end).", "", "## Claims", ""]
    out += _table(["claim", "paper", "ours", "conditions"],
                  [[c["claim"], c["paper"], c["ours"], c["conditions"]] for c in results["claims"]])

    q = results["quality"]
    out += ["", "## Quality: b1.58, b1 and FP twins on the same tokens", "",
            f"Data: {q['data']['description']}; {num(q['data']['train_tokens'], 0)} training tokens, "
            f"{num(q['data']['heldout_tokens'], 0)} held-out tokens (whole files), byte-level BPE vocabulary "
            f"{num(q['data']['vocab_size'], 0)}. Each model: {num(q['train']['steps'], 0)} steps of "
            f"{num(q['train']['batch_size'], 0)}×{num(q['train']['seq_len'], 0)} tokens "
            f"({num(q['train']['tokens_per_model'], 0)} tokens), seed {num(q['train']['seed'], 0)}, the paper's "
            "two-stage schedule for b1.58/b1 and cosine for FP. Perplexity on "
            f"{num(q['data']['eval_tokens'], 0)} held-out tokens; the unigram floor is "
            f"{num(q['unigram_perplexity'], 2)}.", ""]
    modes = list(q["sizes"][0]["models"])
    rows = []
    for size in q["sizes"]:
        row = [size["name"], f"{size['hidden_size']}×{size['layers']}", f"{size['linear_parameters']:,}"]
        row += [num(size["models"][mode]["perplexity"], 2) for mode in modes]
        row += [num(size[f"ppl_ratio_{mode}_fp"], 3) if f"ppl_ratio_{mode}_fp" in size else "—"
                for mode in ("b158", "b1")]
        row += [num(size["train_seconds"], 0)]
        rows.append(row)
    out += _table(["size", "hidden×layers", "linear params"] + [f"{LABELS[mode]} ppl" for mode in modes]
                  + ["b1.58/FP", "b1/FP", "train s (all)"], rows)
    verdict = {True: "shrinks", False: "does not shrink", None: "cannot be judged from these sizes"}
    out += ["", f"The b1.58/FP gap {verdict[q['gap_shrinks_with_size']]} with size in this run.", "",
            "![loss curves](loss_curves.png)", "", "![perplexity ratio](ppl_ratio.png)"]

    c = results["cost"]
    out += ["", "## Cost at the paper's shapes (random weights, no training)", "",
            f"Packed: random ternary codes in the i2 layout, int8 head, our kernels on path "
            f"`{c['kernel_path']}` with {c['threads']} threads. Baseline: the same architecture in torch bf16 "
            f"with {c['threads']} threads. Measured in the same process, one model at a time; each timing is the "
            f"median of {c['repeats']} run(s) of a {c['prompt_tokens']}-token prefill and {c['decode_tokens']} "
            "decode steps (speed and size do not depend on the weight values). Sizes are the bytes of every "
            "stored tensor. This CPU "
            + ("has" if m["native_bf16"] else "has no") + " native bf16 arithmetic (AVX512_BF16/AMX)"
            + ("." if m["native_bf16"] else ", so torch converts bf16 in software: the baseline is slower than "
               "an optimised FP16/FP32 CPU runtime would be, and our speed-ups are larger than against one."), ""]
    crow = []
    for r in c["shapes"]:
        p = TABLE1.get(r["preset"], {})
        crow.append([r["name"] + _depth_note(r), num(r["packed_gb"], 3), num(r["fp16_gb"], 3), _x(r["memory_ratio"]),
                     _x(p["memory_ratio"]) if p else "—", num(r["decode_ms_packed"], 1), num(r["decode_ms_bf16"], 1),
                     _x(r["latency_ratio"]), _x(p["latency_ratio"]) if p else "—",
                     num(r["prefill_tok_s_packed"], 1), num(r["prefill_tok_s_bf16"], 1), _x(r["prefill_ratio"])])
    out += _table(["shape", "packed GB", "FP16 GB", "memory", "paper", "decode ms packed", "decode ms bf16",
                   "latency", "paper", "prefill tok/s packed", "prefill tok/s bf16", "prefill"], crow)
    linear = "; ".join(f"{r['name']} {num(r['linear_packed_gb'], 3)} GB vs {num(r['linear_fp16_gb'], 3)} GB "
                       f"({_x(r['linear_memory_ratio'])}, {num(r['linear_bits_per_weight'], 2)} bits per weight)"
                       for r in c["shapes"])
    rest = "; ".join(f"{r['name']} {num(r['non_linear_packed_gb'], 3)} GB" for r in c["shapes"])
    out += ["", f"Linear layers alone: {linear}. The rest of the packed size is the embedding, head and norms: "
                f"{rest} (an untied input embedding stays fp32 in our runtime).", "", "![cost](cost.png)"]
    if any(r["layers"] != r["full_layers"] for r in c["shapes"]):
        out += ["", "Shapes marked with a layer count were built with fewer layers than the paper's model "
                    "to fit this mode's time budget; their sizes and latencies are those of the cut model."]

    e = results["energy"]
    t = e["table_pj"]
    out += ["", "## Energy", "", f"Op-count model at {results['paper']['process_nm']} nm (pJ per op: FP16 add "
            f"{num(t['fp16_add'], 2)}, FP16 mul {num(t['fp16_mul'], 2)}, INT8 add {num(t['int8_add'], 3)}, FP32 mul "
            f"{num(t['fp32_mul'], 2)}), linear layers only, per token:", ""]
    out += _table(["shape", "linear params", "FP16 µJ", "ternary µJ", "+ rescale µJ", "saving", "with rescale",
                   f"FP16 mJ / {e['estimate_tokens']} tok", f"ternary mJ / {e['estimate_tokens']} tok"],
                  [[s["name"], f"{s['linear_parameters']:,}", num(s["fp16_uj"], 1), num(s["ternary_uj"], 2),
                    num(s["ternary_with_rescale_uj"], 2), _x(s["ratio_paper_accounting"], 1),
                    _x(s["ratio_with_rescale"], 1), num(s["fp16_mj_estimate"], 1), num(s["ternary_mj_estimate"], 2)]
                   for s in e["shapes"]])
    out += ["", "The saving under the paper's accounting is fixed by the table (FP16 mul + add against one INT8 "
                "add per weight), so it is the same at every shape; the rescale column adds the one fp32 multiply "
                "per output our runtime does.", "", "![energy](energy.png)", ""]
    if e["rapl"]["available"]:
        out += ["Measured package energy (RAPL, all packages, includes everything else the machine ran):", ""]
        out += _table(["shape", "packed J/token", "bf16 J/token", "reduction %"],
                      [[r["name"], num(r["energy_j_per_token_packed"], 3), num(r["energy_j_per_token_bf16"], 3),
                        num(r["energy_reduction_pct"], 1)] for r in c["shapes"]])
    else:
        out += [f"Measured energy: **not available** — {e['rapl']['reason']}. No measured figure is reported."]
    out += ["", "## Sources", ""] + [f"- {k}: {v}" for k, v in results["paper"]["sources"].items()]
    return "\n".join(out) + "\n"


def format_summary(results: dict) -> str:
    """The claims table for the terminal."""
    rows = [(c["claim"], c["paper"], c["ours"]) for c in results["claims"]]
    widths = [min(56, max(len(r[i]) for r in rows + [("claim", "paper", "ours")])) for i in range(3)]
    head = f"{'claim':<{widths[0]}}  {'paper':<{widths[1]}}  ours"
    lines = [head, "-" * min(140, len(head) + widths[2])]
    for claim, paper, ours in rows:
        lines.append(f"{claim[:widths[0]]:<{widths[0]}}  {paper[:widths[1]]:<{widths[1]}}  {ours}")
    return "\n".join(lines)
