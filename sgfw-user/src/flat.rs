//! TODO(helper): flat
