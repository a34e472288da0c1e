"""Pod scale on paper: predict step time, MFU and memory of a config on a chip count (`klingjax-plan`)."""
