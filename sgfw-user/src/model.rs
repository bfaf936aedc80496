//! TODO(helper): model
