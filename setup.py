"""ppdistill: knowledge distillation for PaddleDetection detectors.

    pip install -e .               ppdistill alone: keeps the Paddle and ppdet you have (CPU or GPU
                                   Paddle, paddledet or a PaddleDetection checkout)
    pip install -e ".[cpu]"        plus the tested CPU stack: paddlepaddle 2.6.2, paddledet 2.6.0
    pip install -e ".[cpu,bench]"  plus what tools/benchmark.py and tools/visualize.py need (demo)
    pip install -e ".[cpu,test]"   plus pytest (the test suite)

Paddle and ppdet are checked when ppdistill is imported (ppdistill/stack.py), not required here: Paddle's
CPU and GPU builds are different packages, so pip must never swap one for the other.
"""
import os

from setuptools import find_packages, setup

# What ppdistill itself imports besides paddle/ppdet.
REQUIRES = ['numpy', 'pyyaml']

# The tested CPU stack. numpy 2 segfaults paddle 2.6; ppdet 2.6 imports scikit-learn and pkg_resources
# (dropped from setuptools 70) and its visualizer calls ImageDraw.textsize (removed in Pillow 10); the
# pycocotools 2.0.7 wheel is built for numpy 1.x (newer wheels target numpy 2 and can crash next to paddle).
CPU_STACK = [
    'paddlepaddle==2.6.2',
    'paddledet==2.6.0',
    'numpy>=1.21,<1.24',
    'scikit-learn',
    'pycocotools==2.0.7',
    'setuptools<70',
    'Pillow<10',
]
BENCH = ['matplotlib', 'scipy']  # the benchmark's pictures and significance tests, tools/visualize.py

setup(
    name='ppdistill',
    version='0.1.0',
    description='Knowledge distillation (MGD, FGD, CWD, PKD, ...) for PaddleDetection detectors',
    long_description=open('README.md').read() if os.path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['ppdistill', 'ppdistill.*']),
    python_requires='>=3.8',
    install_requires=REQUIRES,
    extras_require={'cpu': CPU_STACK, 'bench': BENCH, 'test': ['pytest'] + BENCH},
    # The tools as commands, for use from any directory (e.g. a PaddleDetection checkout's root).
    entry_points={'console_scripts': [
        'ppdistill-train = ppdistill.tools.train:run',
        'ppdistill-eval = ppdistill.tools.eval:run',
        'ppdistill-infer = ppdistill.tools.infer:run',
        'ppdistill-export = ppdistill.tools.export_model:run',
        'ppdistill-visualize = ppdistill.tools.visualize:run',
    ]},
)
