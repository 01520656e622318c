"""Benchmark helpers behind ``tools/benchmark.py``: seed statistics and reports (:mod:`.stats`), plots
(:mod:`.plots`), the step-cost and memory measurements (:mod:`.speed`), distill-term gradients
(:mod:`.gradients`)."""
import json
import os


def write_report(out_dir: str, name: str, md: str, result: dict) -> str:
    """Write ``<out_dir>/<name>.md`` and ``.json``, print the markdown, return the path without suffix."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    with open(base + '.md', 'w') as f:
        f.write(md)
    with open(base + '.json', 'w') as f:
        json.dump(result, f, indent=1)
    print('\n' + md + f'\n[bench] wrote {base}.md/.json', flush=True)
    return base
