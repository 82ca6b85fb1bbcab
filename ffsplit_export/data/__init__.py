"""Built-in calibration data (written for this project) and calibration readers."""
