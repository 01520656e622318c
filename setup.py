"""ppdistill: knowledge distillation for PaddleDetection detectors.

CPU:  pip install -e .            (pulls paddlepaddle, the CPU wheel)
GPU:  install paddlepaddle-gpu (Paddle install guide), then PPDISTILL_NO_PADDLE_DEP=1 pip install -e .
"""
import os

from setuptools import find_packages, setup

# The tested stack: paddlepaddle 2.6.2 + paddledet 2.6.0. numpy 2 segfaults paddle 2.6; ppdet imports
# sklearn and pkg_resources (dropped from setuptools 70); the pycocotools 2.0.7 wheel is built for
# numpy 1.x (newer wheels target numpy 2 and can segfault next to paddle).
REQUIRES = [
    'paddledet==2.6.0',
    'numpy>=1.21,<1.24',
    'scikit-learn',
    'pycocotools==2.0.7',
    'pyyaml',
    'setuptools<70',
    'Pillow<10',  # ppdet 2.6's visualizer (tools/infer.py) calls ImageDraw.textsize, removed in Pillow 10
    'matplotlib',  # tools/benchmark.py and tools/visualize.py pictures
    'scipy',  # the benchmark's Welch t-test (scikit-learn pulls it too)
]
if not os.environ.get('PPDISTILL_NO_PADDLE_DEP'):
    # GPU users install paddlepaddle-gpu themselves and set PPDISTILL_NO_PADDLE_DEP=1.
    REQUIRES.insert(0, 'paddlepaddle==2.6.2')

setup(
    name='ppdistill',
    version='0.1.0',
    description='Knowledge distillation (MGD, FGD, ...) for PaddleDetection detectors',
    long_description=open('README.md').read() if os.path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['ppdistill', 'ppdistill.*']),
    python_requires='>=3.8',
    install_requires=REQUIRES,
    extras_require={'test': ['pytest']},
    # The tools as commands, for use from any directory (e.g. a PaddleDetection checkout's root).
    entry_points={'console_scripts': [
        'ppdistill-train = ppdistill.tools.train:run',
        'ppdistill-eval = ppdistill.tools.eval:run',
        'ppdistill-infer = ppdistill.tools.infer:run',
        'ppdistill-export = ppdistill.tools.export_model:run',
        'ppdistill-visualize = ppdistill.tools.visualize:run',
    ]},
)
