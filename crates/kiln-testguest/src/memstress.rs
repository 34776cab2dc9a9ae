//! The `memory-stress` scenario. Being written this session: until then it reports FAIL so
//! no run can mistake it for a pass.

use kiln_testguest::line::LineBuf;

use crate::Ctx;

/// Runs `memory-stress`.
pub fn run(_ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    out.push_str("not implemented yet");
    false
}
