import sys
from pathlib import Path

# Worker functions live in these test modules; spawned ranks import them by name.
sys.path.insert(0, str(Path(__file__).parent))
