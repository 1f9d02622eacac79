//! UDP flows (placeholder, filled in below).
