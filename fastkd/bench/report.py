"""The results as a text table (stdout), a markdown file and a JSON file."""
from __future__ import annotations

import json
from pathlib import Path

from fastkd.bench.contenders import COMPILE, EAGER, EXP_FLOOR, FASTKD

COLUMNS = ("N x V", "dtype", "divergence", "implementation", "fwd ms", "bwd ms", "fwd+bwd ms",
           "fastkd speed-up", "peak extra MiB", "x NV fp32", "held MiB", "GB/s", "% peak", "check")
_FIRST_NUMERIC = COLUMNS.index("fwd ms")
SUMMARY_COLUMNS = ("N x V", "dtype", "divergence", "fastkd fwd+bwd ms", "eager ms", "eager / fastkd",
                   "compile ms", "compile / fastkd", "fastkd / fastkd forward_kl", "fastkd / 2x torch.exp",
                   "same, minima", "fastkd peak extra (x NV fp32)")


def divergence_of(case: dict) -> str:
    """The case's divergence (results written before divergences were benchmarked are forward_kl)."""
    return case.get("divergence", "forward_kl")


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _check_cell(name: str, rec: dict, case: dict) -> str:
    """Errors, or the agreement of loss and gradient with eager's (relative errors)."""
    chk = rec.get("check") or {}
    if rec.get("error"):
        return rec["error"]
    if name == EXP_FLOOR:
        ratio = case.get("fastkd_over_exp_floor")
        return "not a loss" + (f": fastkd fwd+bwd = {ratio:.2f}x this" if ratio else "")
    if name == EAGER:
        return "base of the check"
    if rec.get("exact") is False:
        return "n/a (other semantics)"
    if "grad_rel_err" in chk:
        word = "ok" if chk["ok"] else "MISMATCH"
        return f"{word} (loss {chk['loss_rel_err']:.0e}, grad {chk['grad_rel_err']:.0e})"
    return "-"


def case_rows(case: dict) -> list[list[str]]:
    """One row per contender of a case record (see runner.run_case)."""
    if case.get("error"):
        return [[f"{case['n']}x{case['v']}", case["dtype"], divergence_of(case), "-",
                 *["-"] * (len(COLUMNS) - 5), case["error"]]]
    rows = []
    for name, rec in case["contenders"].items():
        med = rec.get("median_ms") or {}
        sp = case.get("speedup", {}).get(name, {}).get("fwd_bwd")
        if name == EXP_FLOOR and case.get("fastkd_over_exp_floor"):
            sp = 1.0 / case["fastkd_over_exp_floor"]  # the same ratio as the peers': its time / fastkd's
        speed = "1.00x (base)" if name == FASTKD and med else (f"{sp:.2f}x" if sp else "-")
        frac = rec.get("roofline_frac")
        check = _check_cell(name, rec, case)
        rows.append([
            f"{case['n']}x{case['v']}", case["dtype"], divergence_of(case), rec["label"],
            _f(med.get("fwd"), ".1f"), _f(med.get("bwd"), ".1f"), _f(med.get("fwd_bwd"), ".1f"), speed,
            _f(rec.get("peak_extra_mib"), ".0f"), _f(rec.get("peak_extra_nv_fp32"), ".2f"),
            _f(rec.get("held_mib"), ".0f"),
            _f(rec.get("gbps"), ".1f"), _f(None if frac is None else 100 * frac, ".0f"), check,
        ])
    return rows


def text_table(cases: list[dict]) -> str:
    """Fixed-width table of every case, a blank line between cases."""
    blocks = [[list(COLUMNS)]] + [case_rows(c) for c in cases]
    widths = [max(len(r[i]) for b in blocks for r in b) for i in range(len(COLUMNS))]
    lines = []
    for bi, block in enumerate(blocks):
        if bi > 1:
            lines.append("")
        for r in block:
            lines.append("  ".join(x.rjust(w) if _FIRST_NUMERIC <= i <= len(COLUMNS) - 2 else x.ljust(w)
                                   for i, (x, w) in enumerate(zip(r, widths, strict=True))).rstrip())
        if bi == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(cases: list[dict]) -> str:
    """The same table in markdown."""
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(r) + " |" for c in cases for r in case_rows(c)]
    return "\n".join(out)


def headline(cases: list[dict]) -> list[str]:
    """One line per case: fastkd forward+backward, its speed-up over each peer, and its time as a
    multiple of the exp floor's."""
    lines = []
    for c in cases:
        fk = c["contenders"].get(FASTKD, {}).get("median_ms")
        if not fk:
            continue
        peers = ", ".join(f"{c['contenders'][p]['label']} {s['fwd_bwd']:.2f}x"
                          for p, s in c.get("speedup", {}).items())
        floor = c.get("fastkd_over_exp_floor")
        lines.append(f"{c['n']}x{c['v']} {c['dtype']} {divergence_of(c)}: fastkd fwd+bwd {fk['fwd_bwd']:.1f} ms; "
                     f"speed-up over {peers or 'no peer'}"
                     + (f"; {floor:.2f}x the time of 2x torch.exp" if floor else ""))
    return lines


def _median(case: dict, name: str, stat: str = "median_ms") -> float | None:
    return ((case["contenders"].get(name) or {}).get(stat) or {}).get("fwd_bwd")


def summary_rows(cases: list[dict]) -> list[list[str]]:
    """Per case, fastkd's forward+backward against eager, torch.compile, fastkd on forward_kl with the
    same shape and dtype, and the exp floor, with fastkd's peak extra memory."""
    fkl = {(c["n"], c["v"], c["dtype"]): _median(c, FASTKD) for c in cases
           if divergence_of(c) == "forward_kl" and not c.get("error")}
    rows = []
    for c in cases:
        fk = _median(c, FASTKD)
        if c.get("error") or not fk:
            continue
        eager, comp, base = _median(c, EAGER), _median(c, COMPILE), fkl.get((c["n"], c["v"], c["dtype"]))
        fk_min, floor_min = _median(c, FASTKD, "min_ms"), _median(c, EXP_FLOOR, "min_ms")
        rows.append([
            f"{c['n']}x{c['v']}", c["dtype"], divergence_of(c), f"{fk:.1f}",
            _f(eager, ".1f"), _f(eager and eager / fk, ".2f"), _f(comp, ".1f"), _f(comp and comp / fk, ".2f"),
            _f(base and fk / base, ".2f"), _f(c.get("fastkd_over_exp_floor"), ".2f"),
            _f(fk_min / floor_min if fk_min and floor_min else None, ".2f"),
            _f(c["contenders"][FASTKD].get("peak_extra_nv_fp32"), ".2f"),
        ])
    return rows


def summary_markdown(cases: list[dict]) -> str:
    """The per-divergence summary table in markdown (empty when no case has a fastkd time)."""
    rows = summary_rows(cases)
    if not rows:
        return ""
    out = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def write_markdown(path: Path, doc: dict) -> None:
    """``<machine>.md``: environment, method, the table."""
    env = doc["environment"]
    lines = [
        f"# fastkd loss benchmark: {doc['machine']}",
        "",
        f"- date: {env['date']}; command: `{env['command']}`",
        f"- torch {env['torch']}, fastkd {env['fastkd']} (git {env.get('fastkd_git_commit')}), "
        f"build: `{env['fastkd_build_info']}`",
        f"- CPU: {env['cpu_model']}, {env['cpu_cores']} cores, {env['torch_threads']} torch threads"
        + (f"; GPU: {env['gpu_name']} ({env['gpu_memory_gib']} GiB)" if env.get("gpu_name") else ""),
        f"- load average at start / end: {env.get('load_average_start')} / {env.get('load_average_end')}",
        f"- config: {doc['config']}",
        "",
        "## Method",
        "",
        *[f"- {m}" for m in doc["method"]],
        *([""] + ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] if doc["notes"] else []),
        "",
        "## Results (medians; speed-up = peer time / fastkd time, forward+backward)",
        "",
        markdown_table(doc["cases"]),
        "",
        *[f"- {h}" for h in headline(doc["cases"])],
        "",
    ]
    summary = summary_markdown(doc["cases"])
    if summary:
        lines += [
            "## Summary by divergence (medians, forward+backward)",
            "",
            summary,
            "",
            "- eager / fastkd, compile / fastkd: fastkd's speed-up over reference eager and "
            "torch.compile(reference) on that divergence",
            "- fastkd / fastkd forward_kl: fastkd's time on that divergence over its time on forward_kl "
            "(same shape and dtype, same run)",
            "- fastkd / 2x torch.exp: fastkd's time over that of two torch.exp passes over the student "
            "logits (CPU only; the exp-throughput floor); 'same, minima': fastkd's fastest step over the "
            "floor's fastest (the floor's time can vary more than fastkd's from round to round)",
            "- fastkd peak extra: in units of one N x V fp32 tensor",
            "",
        ]
    path.write_text("\n".join(lines))


def write_json(path: Path, doc: dict) -> None:
    """``<machine>.json``: every raw sample and the environment."""
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
