import CBrokerWire

/// Encoding and decoding of the client ↔ broker messages (`ClientToBroker`,
/// `BrokerToClient`). These are rare (registration), so they use Swift values.
/// A decode uses the arena given and resets it before returning: the value
/// returned owns its data.
public enum ClientWire {
  /// The packet for a client's request (descriptors travel beside it).
  public static func encode(_ request: ClientRequest) -> [UInt8] {
    let pool = CStringPool()
    var message = Uffdbroker__ClientToBroker()
    uffdbroker__client_to_broker__init(&message)
    message.request_id = request.requestID
    var hello = Uffdbroker__Hello()
    var register = Uffdbroker__Register()
    var add = Uffdbroker__AddRegions()
    var remove = Uffdbroker__RemoveRegions()
    var swapOut = Uffdbroker__SwapOut()
    var swapOutData = Uffdbroker__SwapOutData()
    var swapOutDone = Uffdbroker__SwapOutDone()
    var ids = [UInt64]()
    var payload = [UInt8]()
    return withUnsafeMutablePointer(to: &hello) { helloPointer in
      withUnsafeMutablePointer(to: &register) { registerPointer in
        withUnsafeMutablePointer(to: &add) { addPointer in
          withUnsafeMutablePointer(to: &remove) { removePointer in
            switch request.body {
            case .hello(let value):
              value.encode(into: &helloPointer.pointee, pool: pool)
              message.body_case = UFFDBROKER__CLIENT_TO_BROKER__BODY_HELLO
              message.hello = helloPointer
            case .register(let value):
              uffdbroker__register__init(registerPointer)
              registerPointer.pointee.pid = value.pid
              registerPointer.pointee.features = value.features.rawValue
              registerPointer.pointee.ioctls = value.ioctls.rawValue
              registerPointer.pointee.n_regions = value.regions.count
              registerPointer.pointee.regions = pool.regionArray(value.regions)
              registerPointer.pointee.token_high = value.token.high
              registerPointer.pointee.token_low = value.token.low
              message.body_case = UFFDBROKER__CLIENT_TO_BROKER__BODY_REGISTER
              message.register_ = registerPointer
            case .addRegions(let regions):
              uffdbroker__add_regions__init(addPointer)
              addPointer.pointee.n_regions = regions.count
              addPointer.pointee.regions = pool.regionArray(regions)
              message.body_case = UFFDBROKER__CLIENT_TO_BROKER__BODY_ADD_REGIONS
              message.add_regions = addPointer
            case .removeRegions(let values):
              ids = values
              uffdbroker__remove_regions__init(removePointer)
              message.body_case = UFFDBROKER__CLIENT_TO_BROKER__BODY_REMOVE_REGIONS
              message.remove_regions = removePointer
            case .swapOut(let regionID, let offset, let length):
              uffdbroker__swap_out__init(&swapOut)
              swapOut.region_id = regionID
              swapOut.offset = offset
              swapOut.length = UInt64(length)
              message.body_case = UFFDBROKER__CLIENT_TO_BROKER__BODY_SWAP_OUT
            case .swapOutData(let regionID, let offset, let data):
              payload = data
              uffdbroker__swap_out_data__init(&swapOutData)
              swapOutData.region_id = regionID
              swapOutData.offset = offset
              message.body_case = UFFDBROKER__CLIENT_TO_BROKER__BODY_SWAP_OUT_DATA
            case .swapOutDone(let regionID, let offset, let length):
              uffdbroker__swap_out_done__init(&swapOutDone)
              swapOutDone.region_id = regionID
              swapOutDone.offset = offset
              swapOutDone.length = UInt64(length)
              message.body_case = UFFDBROKER__CLIENT_TO_BROKER__BODY_SWAP_OUT_DONE
            }
            return ids.withUnsafeMutableBufferPointer { idBuffer in
              payload.withUnsafeMutableBufferPointer { payloadBuffer in
                withUnsafeMutablePointer(to: &swapOut) { swapOutPointer in
                  withUnsafeMutablePointer(to: &swapOutData) { swapOutDataPointer in
                    withUnsafeMutablePointer(to: &swapOutDone) { swapOutDonePointer in
                      removePointer.pointee.n_ids = idBuffer.count
                      removePointer.pointee.ids = idBuffer.baseAddress
                      swapOutDataPointer.pointee.data = ProtobufCBinaryData(len: payloadBuffer.count, data: payloadBuffer.baseAddress)
                      switch message.body_case {
                      case UFFDBROKER__CLIENT_TO_BROKER__BODY_SWAP_OUT: message.swap_out = swapOutPointer
                      case UFFDBROKER__CLIENT_TO_BROKER__BODY_SWAP_OUT_DATA: message.swap_out_data = swapOutDataPointer
                      case UFFDBROKER__CLIENT_TO_BROKER__BODY_SWAP_OUT_DONE: message.swap_out_done = swapOutDonePointer
                      default: break
                      }
                      return protobufCPacked(message, size: uffdbroker__client_to_broker__get_packed_size, pack: uffdbroker__client_to_broker__pack)
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
  }

  /// Decodes one packet from a client. Malformed input throws `.malformed`.
  public static func decodeRequest(_ bytes: UnsafeRawBufferPointer, arena: WireArena) throws(BrokerError) -> ClientRequest {
    defer { arena.reset() }
    let message = try arena.unpack(bytes, what: "a client message", with: uffdbroker__client_to_broker__unpack)
    let m = message.pointee
    switch m.body_case {
    case UFFDBROKER__CLIENT_TO_BROKER__BODY_HELLO:
      return ClientRequest(requestID: m.request_id, .hello(try Hello(decoding: m.hello)))
    case UFFDBROKER__CLIENT_TO_BROKER__BODY_REGISTER:
      let r = m.register_.pointee
      return ClientRequest(requestID: m.request_id, .register(RegisterRequest(
        pid: r.pid, features: .init(rawValue: r.features), ioctls: .init(rawValue: r.ioctls),
        regions: try regions(r.regions, count: r.n_regions), token: UInt128(high: r.token_high, low: r.token_low))))
    case UFFDBROKER__CLIENT_TO_BROKER__BODY_ADD_REGIONS:
      let a = m.add_regions.pointee
      return ClientRequest(requestID: m.request_id, .addRegions(try regions(a.regions, count: a.n_regions)))
    case UFFDBROKER__CLIENT_TO_BROKER__BODY_REMOVE_REGIONS:
      let r = m.remove_regions.pointee
      return ClientRequest(requestID: m.request_id, .removeRegions(Array(UnsafeBufferPointer(start: r.ids, count: r.n_ids))))
    case UFFDBROKER__CLIENT_TO_BROKER__BODY_SWAP_OUT:
      let s = m.swap_out.pointee
      guard s.length <= UInt64(Int.max) else { throw BrokerError(.badRegion, "SwapOut length too large") }
      return ClientRequest(requestID: m.request_id, .swapOut(regionID: s.region_id, offset: s.offset, length: Int(s.length)))
    case UFFDBROKER__CLIENT_TO_BROKER__BODY_SWAP_OUT_DATA:
      let s = m.swap_out_data.pointee
      return ClientRequest(requestID: m.request_id, .swapOutData(regionID: s.region_id, offset: s.offset, data: Array(UnsafeBufferPointer(start: s.data.data, count: s.data.len))))
    case UFFDBROKER__CLIENT_TO_BROKER__BODY_SWAP_OUT_DONE:
      let s = m.swap_out_done.pointee
      guard s.length <= UInt64(Int.max) else { throw BrokerError(.badRegion, "SwapOutDone length too large") }
      return ClientRequest(requestID: m.request_id, .swapOutDone(regionID: s.region_id, offset: s.offset, length: Int(s.length)))
    default:
      throw BrokerError(.malformed, "a client message has no body")
    }
  }

  /// The packet for a broker's reply or notice.
  public static func encode(_ reply: BrokerReply) -> [UInt8] {
    let pool = CStringPool()
    var message = Uffdbroker__BrokerToClient()
    uffdbroker__broker_to_client__init(&message)
    message.request_id = reply.requestID
    var hello = Uffdbroker__Hello()
    var ack = Uffdbroker__Ack()
    var error = Uffdbroker__Error()
    var layout = Uffdbroker__Layout()
    var forked = Uffdbroker__Forked()
    var childClosed = Uffdbroker__ChildClosed()
    var dropped = Uffdbroker__Dropped()
    var busy = [UInt64]()
    return withUnsafeMutablePointer(to: &hello) { helloPointer in
      withUnsafeMutablePointer(to: &ack) { ackPointer in
        withUnsafeMutablePointer(to: &error) { errorPointer in
          withUnsafeMutablePointer(to: &layout) { layoutPointer in
          withUnsafeMutablePointer(to: &forked) { forkedPointer in
          withUnsafeMutablePointer(to: &childClosed) { childClosedPointer in
          withUnsafeMutablePointer(to: &dropped) { droppedPointer in
          switch reply.body {
          case .hello(let value):
            value.encode(into: &helloPointer.pointee, pool: pool)
            message.body_case = UFFDBROKER__BROKER_TO_CLIENT__BODY_HELLO
            message.hello = helloPointer
          case .ack(let clientID, let busyOffsets):
            uffdbroker__ack__init(ackPointer)
            ackPointer.pointee.client_id = clientID
            busy = busyOffsets
            message.body_case = UFFDBROKER__BROKER_TO_CLIENT__BODY_ACK
            message.ack = ackPointer
          case .error(let value):
            value.encode(into: &errorPointer.pointee, pool: pool)
            message.body_case = UFFDBROKER__BROKER_TO_CLIENT__BODY_ERROR
            message.error = errorPointer
          case .layout(let regionID, let pieces):
            uffdbroker__layout__init(layoutPointer)
            layoutPointer.pointee.region_id = regionID
            (layoutPointer.pointee.n_pieces, layoutPointer.pointee.pieces) = pool.pieces(pieces)
            message.body_case = UFFDBROKER__BROKER_TO_CLIENT__BODY_LAYOUT
            message.layout = layoutPointer
          case .forked(let childID, let pieces):
            uffdbroker__forked__init(forkedPointer)
            forkedPointer.pointee.child_id = childID
            (forkedPointer.pointee.n_pieces, forkedPointer.pointee.pieces) = pool.pieces(pieces)
            message.body_case = UFFDBROKER__BROKER_TO_CLIENT__BODY_FORKED
            message.forked = forkedPointer
          case .childClosed(let childID):
            uffdbroker__child_closed__init(childClosedPointer)
            childClosedPointer.pointee.child_id = childID
            message.body_case = UFFDBROKER__BROKER_TO_CLIENT__BODY_CHILD_CLOSED
            message.child_closed = childClosedPointer
          case .dropped(let regionID, let offsets, let unknown):
            uffdbroker__dropped__init(droppedPointer)
            droppedPointer.pointee.region_id = regionID
            (droppedPointer.pointee.n_dropped, droppedPointer.pointee.dropped) = pool.extents(offsets)
            (droppedPointer.pointee.n_unknown, droppedPointer.pointee.unknown) = pool.extents(unknown)
            message.body_case = UFFDBROKER__BROKER_TO_CLIENT__BODY_DROPPED
            message.dropped = droppedPointer
          }
          return busy.withUnsafeMutableBufferPointer { busyBuffer in
            ackPointer.pointee.n_busy_offsets = busyBuffer.count
            ackPointer.pointee.busy_offsets = busyBuffer.baseAddress
            return protobufCPacked(message, size: uffdbroker__broker_to_client__get_packed_size, pack: uffdbroker__broker_to_client__pack)
          }
          }
          }
          }
          }
        }
      }
    }
  }

  /// Decodes one packet from the broker. Malformed input throws `.malformed`.
  public static func decodeReply(_ bytes: UnsafeRawBufferPointer, arena: WireArena) throws(BrokerError) -> BrokerReply {
    defer { arena.reset() }
    let message = try arena.unpack(bytes, what: "a broker reply", with: uffdbroker__broker_to_client__unpack)
    let m = message.pointee
    switch m.body_case {
    case UFFDBROKER__BROKER_TO_CLIENT__BODY_HELLO: return BrokerReply(requestID: m.request_id, .hello(try Hello(decoding: m.hello)))
    case UFFDBROKER__BROKER_TO_CLIENT__BODY_ACK:
      let a = m.ack.pointee
      return BrokerReply(requestID: m.request_id, .ack(clientID: a.client_id, busyOffsets: Array(UnsafeBufferPointer(start: a.busy_offsets, count: a.n_busy_offsets))))
    case UFFDBROKER__BROKER_TO_CLIENT__BODY_ERROR: return BrokerReply(requestID: m.request_id, .error(BrokerError(decoding: m.error)))
    case UFFDBROKER__BROKER_TO_CLIENT__BODY_LAYOUT:
      let l = m.layout.pointee
      return BrokerReply(requestID: m.request_id, .layout(regionID: l.region_id, pieces: try decodePieces(l.n_pieces, l.pieces, of: "layout of region \(l.region_id)")))
    case UFFDBROKER__BROKER_TO_CLIENT__BODY_FORKED:
      let f = m.forked.pointee
      return BrokerReply(requestID: m.request_id, .forked(childID: f.child_id, pieces: try decodePieces(f.n_pieces, f.pieces, of: "forked child \(f.child_id)")))
    case UFFDBROKER__BROKER_TO_CLIENT__BODY_CHILD_CLOSED:
      return BrokerReply(requestID: m.request_id, .childClosed(childID: m.child_closed.pointee.child_id))
    case UFFDBROKER__BROKER_TO_CLIENT__BODY_DROPPED:
      let d = m.dropped.pointee
      let what = "the drop record of region \(d.region_id)"
      return BrokerReply(requestID: m.request_id, .dropped(regionID: d.region_id, dropped: try decodeExtents(d.n_dropped, d.dropped, of: what), unknown: try decodeExtents(d.n_unknown, d.unknown, of: what)))
    default: throw BrokerError(.malformed, "a broker reply has no body")
    }
  }

  static func regions(_ pointers: UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__Region>?>?, count: Int) throws(BrokerError) -> [RegionSpec] {
    var result: [RegionSpec] = []
    for index in 0..<count {
      guard let region = pointers?[index] else { throw BrokerError(.malformed, "a region is missing") }
      result.append(try RegionSpec(decoding: region))
    }
    return result
  }
}
