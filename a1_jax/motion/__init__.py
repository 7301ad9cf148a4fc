"""Face -> control video: MediaPipe landmarks, retargeting onto the reference face, drawing, crops."""
