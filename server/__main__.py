"""``python -m server start|stop``: the production TorchServe, run from the current directory."""
from server.launcher import main

main()
