//! The size of a message's properties on the wire. A content header (the properties, headers
//! included) always travels in one frame, and a frame larger than the size negotiated for the
//! connection makes the broker close the whole connection (`FRAME_ERROR frame_too_large`). So a
//! publish checks the size first, and a dead letter leaves out original headers that would not
//! fit beside its own.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};

/// A frame's bytes besides its payload: type, channel, payload size, end marker.
const FRAME_OVERHEAD: usize = 8;
/// A content header's payload besides the properties: class, weight, body size, flags.
const CONTENT_HEADER_FIXED: usize = 14;

/// The largest content header a connection with this negotiated `frame_max` carries (0 means
/// no limit).
pub(crate) fn max_content_header(frame_max: u32) -> usize {
    match frame_max {
        0 => usize::MAX,
        n => (n as usize).saturating_sub(FRAME_OVERHEAD),
    }
}

/// The bytes of a content header carrying `properties`.
pub(crate) fn content_header_size(properties: &BasicProperties) -> usize {
    let p = properties;
    let short = |s: &Option<ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    CONTENT_HEADER_FIXED
        + short(p.content_type())
        + short(p.content_encoding())
        + p.headers().as_ref().map_or(0, table_size)
        + p.delivery_mode().map_or(0, |_| 1)
        + p.priority().map_or(0, |_| 1)
        + short(p.correlation_id())
        + short(p.reply_to())
        + short(p.expiration())
        + short(p.message_id())
        + p.timestamp().map_or(0, |_| 8)
        + short(p.kind())
        + short(p.user_id())
        + short(p.app_id())
        + short(p.cluster_id())
}

/// The bytes of a field table: its length, then each entry.
pub(crate) fn table_size(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(key, value)| entry_size(key, value))
        .sum::<usize>()
}

/// The bytes of one table entry: its key (a short string), then its typed value.
pub(crate) fn entry_size(key: &ShortString, value: &AMQPValue) -> usize {
    1 + key.as_str().len() + value_size(value)
}

/// The bytes of a typed value: its type tag, then the value.
fn value_size(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(a) => 4 + a.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_size).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_size(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_wire_format() {
        let mut nested = FieldTable::default();
        nested.insert("n".into(), AMQPValue::Boolean(true)); // 1+1 + 1+1
        let mut table = FieldTable::default();
        table.insert("a".into(), AMQPValue::LongString("xyz".into())); // 1+1 + 1+4+3
        table.insert("b".into(), AMQPValue::LongLongInt(7)); // 1+1 + 1+8
        table.insert("c".into(), AMQPValue::FieldTable(nested)); // 1+1 + 1+(4+4)
        table.insert(
            "d".into(),
            AMQPValue::FieldArray(vec![AMQPValue::ShortString("hi".into())].into()),
        ); // 1+1 + 1+(4+(1+1+2))
        assert_eq!(table_size(&table), 4 + 10 + 11 + 11 + 11);
        let props = BasicProperties::default()
            .with_message_id("id".into())
            .with_delivery_mode(2)
            .with_timestamp(1)
            .with_headers(table);
        assert_eq!(content_header_size(&props), 14 + 3 + 1 + 8 + 47);
        assert_eq!(max_content_header(131_072), 131_064);
        assert_eq!(max_content_header(0), usize::MAX);
    }
}
