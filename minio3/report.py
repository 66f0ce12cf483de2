"""The page a student opens: one self-contained HTML report of an evaluation (written by eval.py).

    runs/tiny/eval_rl/report.html          (pictures in runs/tiny/eval_rl/report_files/)

It shows the headline table (accuracy by difficulty and turn cap, with standard errors, Avg@K,
mean turns), the turn-scaling plot, why searches failed (table and chart), and every trajectory as
a row a student can read: the overview with each zoom box drawn and numbered, the crops in order,
each turn's thought and action, the answer, right or wrong and why. Rows can be filtered by
difficulty and outcome (a few lines of plain script; without script every row shows). No network,
no framework: the page is well-formed XHTML, so the standard library's XML parser reads it.
"""
from __future__ import annotations

import html
import math
import re
from pathlib import Path

from PIL import Image, ImageDraw

from minio3.data import atomic_path

MAX_ROWS = 300          # a longer run shows its first MAX_ROWS trajectories, and says so
OVERVIEW_PX = 360       # overview width on the page
CROP_PX = 120

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1300px; }
table { border-collapse: collapse; margin: 8px 0 18px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
.traj { border: 1px solid #ccc; margin: 10px 0; padding: 8px; display: flex; gap: 14px; }
.traj.right { border-left: 6px solid #2ca02c; } .traj.wrong { border-left: 6px solid #d62728; }
.turns { flex: 1; font-size: 13px; } .turn { margin: 4px 0; white-space: pre-wrap; }
.crops img { margin: 2px; border: 1px solid #999; } .note { color: #666; }
.why { font-weight: bold; } code { background: #f4f4f4; }
"""
FILTER = """
function show() {
  var d = document.getElementById('d').value, o = document.getElementById('o').value, n = 0;
  document.querySelectorAll('.traj').forEach(function (t) {
    var on = (!d || t.dataset.difficulty === d) && (!o || t.dataset.outcome === o);
    t.style.display = on ? '' : 'none'; n += on ? 1 : 0; });
  document.getElementById('count').textContent = n + ' shown';
}
"""


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def esc(text) -> str:
    """Text for the page: escaped, without the control characters a model can emit (not allowed in XML)."""
    return html.escape(_NOT_XML.sub("\ufffd", str(text)), quote=True)


def stderr(p: float, n: int) -> float:
    """Standard error of a proportion p measured on n independent trials."""
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def headline(res: dict, trajs: list[dict]) -> str:
    """Accuracy by difficulty at every turn cap, each with its standard error."""
    caps = [str(c) for c in res["turn_caps"]]
    n = {d: sum(t["difficulty"] == d for t in trajs) for d in res["by_turn_cap_difficulty"]}
    rows = [(d, s, n[d]) for d, s in res["by_turn_cap_difficulty"].items()]
    rows.append(("all", res["by_turn_cap"], len(trajs)))
    head = "".join(f"<th>cap {c}</th>" for c in caps)
    cell = lambda p, k: f"<td>{p:.3f} ± {stderr(p, k):.3f}</td>"
    body = "".join(f"<tr><td class='l'>{esc(d)} ({k})</td>" + "".join(cell(s[c], k) for c in caps) + "</tr>"
                   for d, s, k in rows)
    return (f"<table><tr><th class='l'>difficulty (rollouts)</th>{head}</tr>{body}</table>"
            f"<p>Avg@{res['k']} {res['avg_at_k']:.3f} · mean turns {res['mean_turns']:.2f} "
            f"(correct answers: {res['mean_turns_correct']:.2f}) · zoom rate {res['zoom_rate']:.2f} · "
            f"exceeded {res['exceeded_rate']:.2f} · {res['n_questions']} questions, "
            f"{res['n_trajectories']} rollouts · ± is one standard error, sqrt(p(1-p)/n) "
            f"(rollouts of one question are not independent when K &gt; 1)</p>")


# the failure table's per-search flags and per-crop verdict rates (eval.failure_table), in print order
FLAGS = ("answered_unseen", "saw_target", "opens_with_list", "list_has_target", "zoom_follows_list", "repeated_zooms", "invalid_calls",
         "target_accepted", "lookalike_accepted")


def failures(table: dict) -> str:
    runs = list(table.values())
    outcomes = [o for o in runs[0]["outcomes"] if any(r["outcomes"][o] for r in runs)]
    head = "".join(f"<th>{esc(d)} ({r['n']})</th>" for d, r in table.items())
    share = lambda o: "".join(f"<td>{r['outcomes'][o]:.2f}</td>" for r in runs)
    body = "".join(f"<tr><td class='l'>{esc(o)}</td>{share(o)}</tr>" for o in outcomes)
    for flag in FLAGS:
        cells = "".join("<td>-</td>" if r.get(flag) is None else f"<td>{r[flag]:.2f}</td>" for r in runs)
        body += f"<tr><td class='l'><i>{esc(flag.replace('_', ' '))}</i></td>{cells}</tr>"
    return f"<table><tr><th class='l'>why</th>{head}</tr>{body}</table>"


def pictures(i: int, t: dict, image: Image.Image, folder: Path) -> tuple[str, list[str]]:
    """The overview with the zoom boxes drawn and numbered, and each crop, downscaled: file names."""
    scale = OVERVIEW_PX / image.width
    over = image.resize((OVERVIEW_PX, max(1, round(image.height * scale))), Image.BILINEAR)
    d = ImageDraw.Draw(over)
    for k, c in enumerate(t["crops"], 1):
        x0, y0, x1, y1 = (v * scale for v in c["pixel_box"])
        d.rectangle([x0, y0, x1, y1], outline=(255, 0, 160), width=2)
        d.text((x0 + 3, y0 + 2), str(k), fill=(255, 0, 160))
    names = [f"{i:04d}.jpg"]
    over.save(folder / names[0], quality=85)
    for k, c in enumerate(t["crops"], 1):
        crop = image.crop(tuple(c["pixel_box"]))
        crop.thumbnail((CROP_PX, CROP_PX))
        names.append(f"{i:04d}_{k}.jpg")
        crop.save(folder / names[-1], quality=85)
    return names[0], names[1:]


def trajectory(i: int, t: dict, why: str, files: tuple[str, list[str]] | None, folder: str) -> str:
    verdict = "right" if t["correct"] else "wrong"
    over, crops = files or (None, [])
    left = f"<img src='{folder}/{over}' alt='overview' width='{OVERVIEW_PX}'/>" if over else ""
    strip = "".join(f"<img src='{folder}/{c}' alt='crop {k}' title='observation {k}'/>"
                    for k, c in enumerate(crops, 1))
    turns = "".join(f"<div class='turn'><b>turn {k}</b> {esc(text)}</div>"
                    for k, text in enumerate(t["turn_texts"], 1))
    return (f"<div class='traj {verdict}' data-difficulty='{esc(t['difficulty'])}' data-outcome='{esc(why)}'>"
            f"<div>{left}<div class='crops'>{strip}</div></div><div class='turns'>"
            f"<div><b>#{i} · {esc(t['doc_id'])}</b> ({esc(t['difficulty'])}) · "
            f"answer <code>{esc(t['answer'])}</code>, solution <code>{esc(t['solution'])}</code> · "
            f"<span class='why'>{verdict}: {esc(why)}</span> · {t['turns']} turns, {t['zooms']} zooms</div>"
            f"{turns}</div></div>")


def filters(trajs: list[dict], whys: list[str]) -> str:
    opts = lambda values: "".join(f"<option value='{esc(v)}'>{esc(v)}</option>" for v in sorted(set(values)))
    return ("<p>difficulty <select id='d' onchange='show()'><option value=''>all</option>"
            f"{opts(t['difficulty'] for t in trajs)}</select> outcome <select id='o' onchange='show()'>"
            f"<option value=''>all</option>{opts(whys)}</select> <span id='count' class='note'></span></p>")


def write(out: Path, res: dict, trajs: list[dict], image_of, title: str, diagnose) -> Path:
    """report.html in `out` (pictures in out/report_files/). `image_of(i)` gives trajectory i's
    original image; `diagnose(t)` its failure analysis (eval.py's)."""
    folder = out / "report_files"
    folder.mkdir(parents=True, exist_ok=True)
    shown = trajs[:MAX_ROWS]
    whys = [diagnose(t)["outcome"] for t in shown]
    rows = [trajectory(i, t, why, pictures(i, t, image_of(i), folder) if image_of else None, folder.name)
            for i, (t, why) in enumerate(zip(shown, whys))]
    capped = "" if len(trajs) == len(shown) else (
        f"<p class='note'>Showing the first {len(shown)} of {len(trajs)} trajectories; all of them are in "
        "trajectories.jsonl.</p>")
    page = (f"<!DOCTYPE html>\n<html xmlns='http://www.w3.org/1999/xhtml'>"
            f"<head><meta charset='utf-8'/><title>{esc(title)}</title><style>{STYLE}</style>"
            f"<script>//<![CDATA[\n{FILTER}//]]></script></head><body><h1>{esc(title)}</h1>"
            f"<p class='note'>model <code>{esc(res['model'])}</code> · data <code>{esc(res['data'])}</code>"
            f" · {'greedy' if res['greedy'] else 'sampled'} · {res['seconds']:.0f} s</p>"
            f"<h2>Accuracy by turn cap</h2>{headline(res, trajs)}"
            f"<img src='turn_scaling.png' alt='accuracy against the turn cap'/>"
            f"<h2>Why searches ended</h2>{failures(res['failures'])}<img src='failures.png' alt='outcomes'/>"
            f"<h2>Every search</h2>{filters(shown, whys)}{capped}{''.join(rows)}</body></html>\n")
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def write_compare(path: Path, runs: dict[str, dict]) -> Path:
    """compare.html beside the comparison plot `path`: each run's headline and failure tables."""
    parts = []
    for name, res in runs.items():
        caps = [str(c) for c in res["turn_caps"]]
        n = res["failures"]["all"]["n"] if "failures" in res else res["n_trajectories"]
        acc = res["by_turn_cap"]
        row = "".join(f"<td>{acc[c]:.3f} ± {stderr(acc[c], n):.3f}</td>" for c in caps)
        head = "".join(f"<th>cap {c}</th>" for c in caps)
        parts.append(f"<h2>{esc(name)}</h2><p class='note'>model <code>{esc(res['model'])}</code></p>"
                     f"<table><tr><th class='l'>all ({n})</th>{head}</tr>"
                     f"<tr><td class='l'>accuracy</td>{row}</tr></table>"
                     + (failures(res["failures"]) if "failures" in res else ""))
    page = (f"<!DOCTYPE html>\n<html xmlns='http://www.w3.org/1999/xhtml'><head><meta charset='utf-8'/>"
            f"<title>comparison</title><style>{STYLE}</style></head><body><h1>{esc(' vs '.join(runs))}</h1>"
            f"<img src='{esc(path.name)}' alt='accuracy against the turn cap'/>{''.join(parts)}"
            "</body></html>\n")
    out = path.with_suffix(".html")
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
