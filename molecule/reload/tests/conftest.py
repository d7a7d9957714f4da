import sys
from pathlib import Path

# molecule/resources/checks.py: the probes every scenario's tests share.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources"))
