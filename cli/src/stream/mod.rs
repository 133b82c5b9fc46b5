//! The CLI's side of streams: frame sources (IDX, image folders, video), shift schedules
//! (corruptions, label orders) and the run report. The frame protocol itself is the library's
//! [`acclimate::stream`].

pub mod corrupt;
pub mod report;
pub mod schedule;
pub mod source;
