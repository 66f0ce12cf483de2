"""Mini-o3's LLM-judge reward: a rule match first, then a judge model for open answers.

rl.py rewards with it when given --judge, eval.py grades with it; both run the judge through the
same engine as the policy (text only, greedy)."""
from __future__ import annotations

from minio3.conversation import PLAIN_SYSTEM_PROMPT, grade
from minio3.engine import Engine, Sample, Settings
from minio3.protocol import read_score


JUDGE_PROMPT = ("You grade answers to questions about images.\nQuestion: {question}\n"
                "Reference answer: {reference}\nCandidate answer: {answer}\n"
                "Does the candidate answer mean the same as the reference answer? "
                "Reply with exactly \"Score: 1\" if it does and \"Score: 0\" if it does not.")


def judge(engine: Engine, rows: list[dict], answers: list[str | None], texts: dict | None = None) -> list[float]:
    """Mini-o3's LLM-judge reward: exact/normalised match first; otherwise the judge model (run
    through the same engine, text only, greedy) decides with "Score: 0" or "Score: 1". `texts`
    (protocol.load_judge_prompt) replaces the judge's system prompt and query."""
    texts = texts or {"system": PLAIN_SYSTEM_PROMPT, "query": JUDGE_PROMPT}
    fill = lambda i: (texts["query"].replace("{question}", rows[i]["problem"].replace("<image>", "").strip())
                      .replace("{reference}", str(rows[i]["solution"])).replace("{answer}", answers[i]))
    scores = [grade(a, r) for a, r in zip(answers, rows)]
    ask = [i for i, (a, s) in enumerate(zip(answers, scores))
           if a is not None and s == 0 and not rows[i].get("options")]
    samples = [Sample(None, fill(i), system=texts["system"] or PLAIN_SYSTEM_PROMPT) for i in ask]
    verdicts = engine.run(samples, Settings(max_turns=1, greedy=True, max_turn_tokens=32), progress=False)
    for i, t in zip(ask, verdicts):
        scores[i] = read_score(t.turn_texts[-1] if t.turn_texts else "")
    return scores
