# Hydra configuration shipped inside the wheel as cfexplain.conf (see setup.py).
