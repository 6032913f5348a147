"""``python -m rmoe.lm_eval``: lm-evaluation-harness's own command line, with rmoe registered.

Importing rmoe registers the ``rmoe`` model type with transformers' Auto classes, so
``--model hf --model_args pretrained=RUN`` loads an rmoe run; importing
:mod:`rmoe.integrations.lm_eval` registers the ``rmoe`` lm_eval model (rmoe's own tokenizer and
loader); and the built-in offline tasks (``rmoe_pydoc_mc``, ``rmoe_pydoc_cloze``, tag
``rmoe_pydoc``) are added to every task list lm_eval builds. All other arguments are lm_eval's
(``run``, ``ls tasks``, ``--include_path DIR`` for local task YAMLs...)::

    python -m rmoe.lm_eval --model rmoe --model_args pretrained=runs/tiny-rmoe \\
        --tasks rmoe_pydoc_mc --limit 100 --device cpu
    python -m rmoe.lm_eval ls tasks

Needs ``pip install 'rmoe[eval]'``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Hand ``argv`` (default: the command line) to lm_eval's command line; the exit status."""
    from rmoe.integrations.lm_eval import run_lm_eval_cli

    try:
        return run_lm_eval_cli(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:  # lm_eval not installed (or too old)
        print(f"python -m rmoe.lm_eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
