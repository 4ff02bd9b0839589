"""The single-call pipelines that are not SAM 2 (SAM 2 is server/sam2/): object detection
(YOLOv8), matting (background removal) and the backgrounds a matted image is composited on."""
