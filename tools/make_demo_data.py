#!/usr/bin/env python
"""Generate a synthetic detection dataset for the demo: digits (default) or shapes.

Examples (from the repository root)::

    python tools/make_demo_data.py                       # dataset/digits
    python tools/make_demo_data.py --kind shapes         # dataset/shapes
    python tools/make_demo_data.py --num_train 8 --num_val 4 \
        --out dataset/digits_tiny                        # for quick tests

If the output directory already holds a dataset generated with the same
parameters (recorded in ``meta.json``), nothing is regenerated.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppdistill.demo.data import DEFAULT_PARAMS, make_digits_dataset  # noqa: E402
from ppdistill.demo.shapes import make_shapes_dataset  # noqa: E402

# both generators share DEFAULT_PARAMS' defaults
MAKERS = {'digits': make_digits_dataset, 'shapes': make_shapes_dataset}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--kind', choices=sorted(MAKERS), default='digits',
                   help='digits (scikit-learn glyphs) or shapes (ten geometric '
                        'classes) (default: %(default)s)')
    p.add_argument('--out', default=None,
                   help='output directory (default: dataset/<kind>)')
    p.add_argument('--num_train', type=int,
                   default=DEFAULT_PARAMS['num_train'],
                   help='number of training images (default: %(default)s)')
    p.add_argument('--num_val', type=int, default=DEFAULT_PARAMS['num_val'],
                   help='number of validation images (default: %(default)s)')
    p.add_argument('--image_size', type=int,
                   default=DEFAULT_PARAMS['image_size'],
                   help='image side in pixels (default: %(default)s)')
    p.add_argument('--min_objects', type=int,
                   default=DEFAULT_PARAMS['min_objects'],
                   help='min objects per image (default: %(default)s)')
    p.add_argument('--max_objects', type=int,
                   default=DEFAULT_PARAMS['max_objects'],
                   help='max objects per image (default: %(default)s)')
    p.add_argument('--seed', type=int, default=DEFAULT_PARAMS['seed'],
                   help='random seed (default: %(default)s)')
    p.add_argument('--overwrite', action='store_true',
                   help='regenerate even if an identical dataset exists')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    args.out = args.out or os.path.join('dataset', args.kind)
    info = MAKERS[args.kind](
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        seed=args.seed,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        overwrite=args.overwrite)
    if not info['regenerated']:
        print('{} already holds a {} dataset with the same parameters '
              '({}); skipping regeneration (use --overwrite to force).'.format(
                  args.out, args.kind, ', '.join('{}={}'.format(k, v)
                                      for k, v in info['params'].items())))
    else:
        print('wrote {}: {} train images ({} objects), {} val images '
              '({} objects), {}x{} px, in {:.1f}s'.format(
                  args.out, info['num_train'], info['num_train_objects'],
                  info['num_val'], info['num_val_objects'],
                  info['image_size'], info['image_size'], time.time() - t0))
    return 0


if __name__ == '__main__':
    sys.exit(main())
