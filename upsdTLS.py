#!/usr/bin/env python3
"""upsdTLS: placeholder until its issue lands."""
import sys

print("usage: upsdTLS.py [options] (not implemented yet)", file=sys.stderr)
sys.exit(2)
