import os
import sys

# The scripts live at the repository root and are imported as modules by the tests.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
