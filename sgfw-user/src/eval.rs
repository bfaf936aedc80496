//! TODO(helper): eval
