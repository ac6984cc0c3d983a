#!/usr/bin/env python3
"""An external reward program for `med-rlvr train` (`reward.program`).

Protocol: one JSON request per line on stdin, one JSON answer per line on stdout, in the same
order. A request holds `id`, `prompt`, `reply`, `item_id`, `question`, `options`, `answer` (the
gold letter) and `category`. An answer is `{"reward": number, "components": {name: number}}`;
the components are optional and their per-step means are logged in metrics.jsonl.

This example: +1 when the reply's <answer> block holds the gold letter, 0 for another letter,
-1 when there is no <answer> block; minus 0.001 per word of the reply beyond 50 (a length
penalty), reported as the components `correct`, `formatted` and `length_penalty`.

    [reward]
    program = ["python3", "examples/reward.py"]             # add "--log", "FILE" to keep every answer
    timeout_s = 60

Only the standard library; flush after every answer (or at least after every batch).
"""
import json
import re
import sys

ANSWER = re.compile(r"<answer>\s*\(?([A-Z])\b", re.S)


def reward(request):
    match = ANSWER.search(request["reply"])
    formatted = match is not None
    correct = formatted and match.group(1) == request["answer"]
    words = len(request["reply"].split())
    penalty = 0.001 * max(0, words - 50)
    base = (1.0 if correct else 0.0) if formatted else -1.0
    return {
        "reward": base - penalty,
        "components": {
            "correct": float(correct),
            "formatted": float(formatted),
            "length_penalty": penalty,
        },
    }


def main():
    log = None
    if len(sys.argv) == 3 and sys.argv[1] == "--log":
        log = open(sys.argv[2], "a")
    elif len(sys.argv) != 1:
        sys.exit("usage: reward.py [--log FILE]")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        answer = reward(request)
        if log:
            log.write(json.dumps({"id": request["id"], **answer}) + "\n")
            log.flush()
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
